'use strict'

// SPEC section 1: what require() gives, every method's existence and Promise-ness, and the shapes of
// ServiceResponse and of the objects in it (dates are real Date instances). Plus the shared instance.

const test = require('node:test')
const assert = require('node:assert/strict')
const { PKG, newManager, runFixture, expectClean, fakeKey } = require('./helpers')

const METHODS = [
  'initialize',
  'getBestAvailableKey',
  'getNextKeyForRotation',
  'recordUsage',
  'handleRateLimit',
  'getRateLimitInfo',
  'getAllKeysStatus',
  'reactivateKey',
  'resetAllLimits',
  'refreshCache',
  'close',
]

function assertDate(value, what) {
  assert.ok(value instanceof Date, `${what} is not a Date: ${Object.prototype.toString.call(value)}`)
  assert.ok(!Number.isNaN(value.getTime()), `${what} is an invalid Date`)
}

function assertWindow(w, what) {
  assert.equal(typeof w.current, 'number', `${what}.current`)
  assert.equal(typeof w.limit, 'number', `${what}.limit`)
  assertDate(w.resetTime, `${what}.resetTime`)
}

function assertKeyStatus(s, key) {
  assert.equal(s.apiKey, key)
  assert.equal(typeof s.isActive, 'boolean')
  assertDate(s.lastUsed, 'lastUsed')
  for (const w of ['rpm', 'rpd', 'tpm']) assertWindow(s.limits[w], `limits.${w}`)
  assert.equal(typeof s.errorCount, 'number')
  if (s.lastError !== undefined) assert.equal(typeof s.lastError, 'string')
  if (s.lastErrorTime !== undefined) assertDate(s.lastErrorTime, 'lastErrorTime')
}

function assertSuccess(r) {
  assert.equal(r.success, true, `expected success, got ${JSON.stringify(r)}`)
  assert.equal(r.error, undefined)
  assert.equal(typeof r.metadata, 'object')
  assert.ok(r.metadata !== null)
}

test('require gives getApiKeyManager and ApiKeyManagerService', () => {
  const mod = require(PKG)
  assert.equal(typeof mod.getApiKeyManager, 'function')
  assert.equal(typeof mod.ApiKeyManagerService, 'function')
  assert.ok(new mod.ApiKeyManagerService({ keys: [fakeKey(1)], quiet: true }) instanceof mod.ApiKeyManagerService)
})

test('every SPEC section 1 method exists and returns a Promise', async () => {
  const { m, keys } = newManager(2)
  for (const name of METHODS) assert.equal(typeof m[name], 'function', `${name} is missing`)
  const calls = {
    initialize: () => m.initialize(),
    getBestAvailableKey: () => m.getBestAvailableKey(),
    getNextKeyForRotation: () => m.getNextKeyForRotation(),
    recordUsage: () => m.recordUsage(keys[0], 10, true, undefined, 5),
    handleRateLimit: () => m.handleRateLimit(keys[1], 'TPM'),
    getRateLimitInfo: () => m.getRateLimitInfo(keys[0]),
    getAllKeysStatus: () => m.getAllKeysStatus(),
    reactivateKey: () => m.reactivateKey(keys[1]),
    resetAllLimits: () => m.resetAllLimits(),
    refreshCache: () => m.refreshCache(),
    close: () => m.close(),
  }
  for (const name of METHODS) {
    const p = calls[name]()
    assert.ok(p instanceof Promise, `${name} did not return a Promise`)
    const r = await p
    if (name === 'close') assert.equal(r, undefined)
    else assert.equal(r.success, true, `${name}: ${JSON.stringify(r)}`)
  }
})

test('initialize resolves to ServiceResponse<ApiKeyManager> with Date lastRotation and in-memory metadata', async () => {
  const { m, keys } = newManager(3)
  const r = await m.initialize()
  assertSuccess(r)
  assert.deepEqual(r.metadata, { totalKeys: 3, mode: 'in-memory' })
  assert.equal(r.data.totalKeys, 3)
  assert.equal(typeof r.data.currentIndex, 'number')
  assertDate(r.data.lastRotation, 'lastRotation')
  assert.equal(r.data.keys.length, 3)
  r.data.keys.forEach((s, i) => assertKeyStatus(s, keys[i]))
})

test('getBestAvailableKey and getNextKeyForRotation resolve to [apiKey, ApiKeyStatus] with Date fields', async () => {
  const { m, keys } = newManager(2)
  for (const r of [await m.getBestAvailableKey(), await m.getNextKeyForRotation()]) {
    assertSuccess(r)
    assert.ok(Array.isArray(r.data) && r.data.length === 2)
    const [apiKey, status] = r.data
    assert.ok(keys.includes(apiKey))
    assertKeyStatus(status, apiKey)
    assert.equal(typeof r.metadata.availabilityScore, 'number')
  }
})

test('recordUsage, handleRateLimit, reactivateKey, resetAllLimits, refreshCache resolve to data-less successes', async () => {
  const { m, keys } = newManager(2)
  for (const r of [
    await m.recordUsage(keys[0], 100, true, undefined, 42),
    await m.recordUsage(keys[0], 0, false, 'HTTP 500', 17),
    await m.handleRateLimit(keys[1], 'RPM'),
    await m.reactivateKey(keys[1]),
    await m.resetAllLimits(),
    await m.refreshCache(),
  ]) {
    assertSuccess(r)
    assert.equal(r.data, undefined)
  }
})

test('getRateLimitInfo resolves to RPM, RPD, TPM entries with Date resetTime', async () => {
  const { m, keys } = newManager(1)
  const r = await m.getRateLimitInfo(keys[0])
  assertSuccess(r)
  assert.deepEqual(r.data.map((i) => i.type), ['RPM', 'RPD', 'TPM'])
  for (const info of r.data) {
    assert.equal(typeof info.current, 'number')
    assert.equal(typeof info.limit, 'number')
    assert.equal(typeof info.isLimited, 'boolean')
    assertDate(info.resetTime, `${info.type}.resetTime`)
  }
})

test('getAllKeysStatus resolves to one ApiKeyStatus per key, lastError and lastErrorTime filled after a failure', async () => {
  const { m, keys } = newManager(2)
  await m.recordUsage(keys[1], 0, false, 'HTTP 503 Service Unavailable', 300)
  const r = await m.getAllKeysStatus()
  assertSuccess(r)
  assert.equal(r.data.length, 2)
  r.data.forEach((s, i) => assertKeyStatus(s, keys[i]))
  assert.equal(r.data[1].lastError, 'HTTP 503 Service Unavailable')
  assertDate(r.data[1].lastErrorTime, 'lastErrorTime')
  assert.equal(r.data[0].lastError, undefined)
  assert.equal(r.data[0].lastErrorTime, undefined)
})

test('module loads as ESM too: named imports from the package', () => {
  const { spawnSync } = require('node:child_process')
  const { cleanEnv } = require('./helpers')
  const url = require('node:url').pathToFileURL(require('node:path').join(PKG, 'lib', 'index.js')).href
  const code = `import { getApiKeyManager, ApiKeyManagerService } from ${JSON.stringify(url)};
    console.log(typeof getApiKeyManager, typeof ApiKeyManagerService)`
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], { env: cleanEnv(), encoding: 'utf8' })
  assert.equal(r.status, 0, r.stderr)
  assert.equal(r.stdout.trim(), 'function function')
})

test('getApiKeyManager returns the same instance on repeated and concurrent calls (child process)', () => {
  const keys = [fakeKey(1), fakeKey(2), fakeKey(3)]
  const out = expectClean(
    runFixture('singleton.js', {
      env: { GEMINI_API_KEY_1: keys[0], GEMINI_API_KEY_2: keys[1], GEMINI_API_KEY_3: keys[2] },
    }),
    assert,
  )
  assert.equal(out.isService, true)
  assert.equal(out.sameSequential, true)
  assert.equal(out.sameConcurrent, true)
  assert.equal(out.bestSuccess, true)
})

test('after close() of the shared instance, getApiKeyManager creates a new working one (child process)', () => {
  const out = expectClean(runFixture('singleton.js', { env: { GEMINI_API_KEY_1: fakeKey(1) } }), assert)
  assert.deepEqual(out.afterClose, { fresh: true, works: true, oldClosed: 'API key manager is closed' })
})

test('initialize() twice is harmless: same totalKeys and metadata { totalKeys, mode: in-memory }', async () => {
  const { m } = newManager(4)
  const first = await m.initialize()
  const second = await m.initialize()
  for (const r of [first, second]) {
    assert.equal(r.success, true)
    assert.deepEqual(r.metadata, { totalKeys: 4, mode: 'in-memory' })
    assert.equal(r.data.totalKeys, 4)
  }
  assert.equal((await m.getAllKeysStatus()).data.length, 4)
  assert.equal((await m.getBestAvailableKey()).success, true)
})

test('initialize() on the shared instance again is harmless (child process)', () => {
  const keys = [fakeKey(1), fakeKey(2), fakeKey(3)]
  const out = expectClean(
    runFixture('singleton.js', {
      env: { GEMINI_API_KEY_1: keys[0], GEMINI_API_KEY_2: keys[1], GEMINI_API_KEY_3: keys[2] },
    }),
    assert,
  )
  assert.deepEqual(out.reinit, { success: true, metadata: { totalKeys: 3, mode: 'in-memory' }, totalKeys: 3 })
  assert.equal(out.statusCount, 3)
})
