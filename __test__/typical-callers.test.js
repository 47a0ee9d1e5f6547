'use strict'

// SPEC section 1 "Typical callers", run as it is in a child process: keys from GEMINI_API_KEY_1..,
// the package required through the old module path.

const test = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')
const { FIXTURES, runFixture, expectClean, fakeKey } = require('./helpers')

test('SPEC section 1 typical callers run unchanged against the package', () => {
  const keys = [fakeKey(1), fakeKey(2), fakeKey(3)]
  const run = runFixture(path.join('old-app', 'typical-callers.js'), {
    cwd: path.join(FIXTURES, 'old-app'),
    env: { GEMINI_API_KEY_1: keys[0], GEMINI_API_KEY_2: keys[1], GEMINI_API_KEY_3: keys[2] },
  })
  const out = expectClean(run, assert)

  // getBestAvailableKey: r.data is [apiKey, keyStatus], r.metadata.availabilityScore a fresh key's 1.
  assert.equal(out.best.success, true)
  assert.ok(keys.includes(out.best.apiKey))
  assert.equal(out.best.statusKey, out.best.apiKey)
  assert.equal(out.best.score, 1)
  assert.equal(out.best.totalAvailable, 3)
  assert.equal(out.best.rotationMethod, 'round-robin')
  assert.equal(out.best.lastUsedIsDate, true)

  // getNextKeyForRotation: nothing is weak, so no proactive rotation, but a reason is given.
  assert.equal(out.rotation.success, true)
  assert.ok(keys.includes(out.rotation.apiKey))
  assert.equal(typeof out.rotation.rotationReason, 'string')
  assert.notEqual(out.rotation.rotationReason, 'proactive-rotation')

  // recordUsage(success): counted.
  assert.equal(out.ok.success, true)
  assert.deepEqual(
    { rpm: out.afterOk.rpm, rpd: out.afterOk.rpd, tpm: out.afterOk.tpm, errorCount: out.afterOk.errorCount },
    { rpm: 1, rpd: 1, tpm: 1234, errorCount: 0 },
  )

  // recordUsage(failure): an error counted, message and time kept.
  assert.equal(out.failed.success, true)
  assert.equal(out.afterFailure.errorCount, 1)
  assert.equal(out.afterFailure.lastError, 'HTTP 503: The model is overloaded')
  assert.equal(out.afterFailure.lastErrorTimeIsDate, true)
  assert.equal(out.afterFailure.isActive, true)

  // handleRateLimit(apiKey, 'RPM'): the key rests until its minute frees; counts stay honest.
  assert.equal(out.rateLimited.success, true)
  assert.equal(out.rpmAfter429.isLimited, true)
  assert.equal(out.rpmAfter429.current, 1)
  assert.equal(out.rpmAfter429.limit, 30)
  assert.equal(out.afterRateLimit.errorCount, 2)

  // Without `quiet`, the start-up line operators grep for is printed once.
  assert.equal(run.lines.filter((l) => l === '✅ In-memory API Key Manager initialized with 3 keys').length, 1)
})
