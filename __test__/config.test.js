'use strict'

// SPEC section 2-3 configuration: keys and limits from the environment (each test in its own child
// process, so nothing leaks), options overriding the environment, and refusals that are returned.

const test = require('node:test')
const assert = require('node:assert/strict')
const { runFixture, expectClean, fakeKey, mask, assertFailure, settle } = require('./helpers')
const { ApiKeyManagerService } = require('..')

const K = Array.from({ length: 6 }, (_, i) => fakeKey(i + 1))

/** Runs fixtures/env-manager.js with `env` (plus the list of keys to report positions against). */
function fromEnv(env, options = { quiet: true }) {
  return runFixture('env-manager.js', {
    env: { TEST_GIVEN_KEYS: JSON.stringify(K), ...env },
    args: [JSON.stringify(options)],
  })
}

test('keys come from GEMINI_API_KEY_1..N in order, stopping at the first gap', () => {
  const out = expectClean(
    fromEnv({ GEMINI_API_KEY_1: K[0], GEMINI_API_KEY_2: K[1], GEMINI_API_KEY_3: K[2], GEMINI_API_KEY_5: K[4] }),
    assert,
  )
  assert.equal(out.init.success, true)
  assert.equal(out.totalKeys, 3)
  assert.deepEqual(out.keyPositions, [0, 1, 2])
  assert.deepEqual(out.init.metadata, { totalKeys: 3, mode: 'in-memory' })
})

test('GEMINI_API_KEY_2 missing: only GEMINI_API_KEY_1 is read', () => {
  const out = expectClean(fromEnv({ GEMINI_API_KEY_1: K[0], GEMINI_API_KEY_3: K[2] }), assert)
  assert.deepEqual(out.keyPositions, [0])
})

test('GEMINI_API_KEYS gives comma-separated keys, trimmed', () => {
  const out = expectClean(fromEnv({ GEMINI_API_KEYS: `${K[0]}, ${K[1]} ,${K[2]}` }), assert)
  assert.equal(out.init.success, true)
  assert.deepEqual(out.keyPositions, [0, 1, 2])
})

test('GEMINI_API_KEY_1..N and GEMINI_API_KEYS together give both lists', () => {
  const out = expectClean(
    fromEnv({ GEMINI_API_KEY_1: K[0], GEMINI_API_KEY_2: K[1], GEMINI_API_KEYS: `${K[2]},${K[3]}` }),
    assert,
  )
  assert.deepEqual(out.keyPositions, [0, 1, 2, 3])
})

test('empty entries and duplicates are dropped with a warning on stderr that never shows the full key', () => {
  const run = fromEnv(
    { GEMINI_API_KEYS: `${K[0]},,${K[1]},${K[0]}, ,${K[2]}`, GEMINI_API_KEY_1: K[1] },
    { quiet: false },
  )
  const out = expectClean(run, assert)
  assert.deepEqual(out.keyPositions, [1, 0, 2])
  assert.equal(out.totalKeys, 3)
  const warnings = run.stderr.split('\n').filter((l) => l.trim() !== '')
  assert.ok(warnings.some((l) => /empty/i.test(l)), `no warning about the empty entries:\n${run.stderr}`)
  assert.ok(
    warnings.some((l) => /duplicate/i.test(l) && l.includes(mask(K[0]))),
    `no masked warning about the duplicate ${mask(K[0])}:\n${run.stderr}`,
  )
  assert.ok(
    warnings.some((l) => /duplicate/i.test(l) && l.includes(mask(K[1]))),
    `no masked warning about the duplicate ${mask(K[1])}:\n${run.stderr}`,
  )
  for (const line of run.lines) {
    for (const key of K) assert.ok(!line.includes(key), `a full key was printed: ${line}`)
    for (const key of K) assert.ok(!line.includes(key.slice(8, -4)), `the hidden part of a key was printed: ${line}`)
  }
})

test('limits default to RPM 30, RPD 200, TPM 1,000,000', () => {
  const out = expectClean(fromEnv({ GEMINI_API_KEY_1: K[0] }), assert)
  assert.deepEqual(out.limits, { rpm: 30, rpd: 200, tpm: 1000000 })
})

test('limits come from GEMINI_RPM_LIMIT, GEMINI_RPD_LIMIT, GEMINI_TPM_LIMIT', () => {
  const out = expectClean(
    fromEnv({ GEMINI_API_KEY_1: K[0], GEMINI_RPM_LIMIT: '60', GEMINI_RPD_LIMIT: '1500', GEMINI_TPM_LIMIT: '4000000' }),
    assert,
  )
  assert.deepEqual(out.limits, { rpm: 60, rpd: 1500, tpm: 4000000 })
})

test('options.limits override the environment, limit by limit', () => {
  const out = expectClean(
    fromEnv(
      { GEMINI_API_KEY_1: K[0], GEMINI_RPM_LIMIT: '60', GEMINI_RPD_LIMIT: '1500', GEMINI_TPM_LIMIT: '4000000' },
      { quiet: true, limits: { rpm: 5, tpm: 777 } },
    ),
    assert,
  )
  assert.deepEqual(out.limits, { rpm: 5, rpd: 1500, tpm: 777 })
})

test('options.keys replace the environment keys', () => {
  const out = expectClean(fromEnv({ GEMINI_API_KEY_1: K[0] }, { quiet: true, keys: [K[3], K[4]] }), assert)
  assert.deepEqual(out.keyPositions, [3, 4])
})

test("no keys at all: initialize gives 'No Gemini API keys provided in environment variables', getBestAvailableKey a failure, no throw", () => {
  const out = expectClean(fromEnv({}), assert)
  assert.equal(out.init.success, false)
  assert.equal(out.init.error, 'No Gemini API keys provided in environment variables')
  assert.equal(out.best.success, false)
  assert.equal(typeof out.best.error, 'string')
  assert.equal(out.status.success, false)
})

test('no keys at all with GEMINI_API_KEYS empty or only commas: the same refusal', () => {
  for (const list of ['', ' , ,']) {
    const out = expectClean(fromEnv({ GEMINI_API_KEYS: list }), assert)
    assert.equal(out.init.success, false)
    assert.equal(out.init.error, 'No Gemini API keys provided in environment variables')
  }
})

test('keys: [] in options gives the no-keys refusal, not a throw', async () => {
  const m = new ApiKeyManagerService({ keys: [], quiet: true })
  assertFailure(assert, await settle(() => m.initialize()), 'No Gemini API keys provided in environment variables')
  assertFailure(assert, await settle(() => m.getBestAvailableKey()))
  assertFailure(assert, await settle(() => m.recordUsage(K[0], 1, true)))
})

test('a bad GEMINI_RPM_LIMIT (abc) makes initialize fail with an error naming the variable', () => {
  const out = expectClean(fromEnv({ GEMINI_API_KEY_1: K[0], GEMINI_RPM_LIMIT: 'abc' }), assert)
  assert.equal(out.init.success, false)
  assert.match(out.init.error, /GEMINI_RPM_LIMIT/)
  assert.match(out.init.error, /abc/)
  assert.equal(out.best.success, false)
})

test('bad GEMINI_RPD_LIMIT / GEMINI_TPM_LIMIT values (0, -5, 2.5) are refused the same way', () => {
  for (const [name, value] of [['GEMINI_RPD_LIMIT', '0'], ['GEMINI_TPM_LIMIT', '-5'], ['GEMINI_RPM_LIMIT', '2.5']]) {
    const out = expectClean(fromEnv({ GEMINI_API_KEY_1: K[0], [name]: value }), assert)
    assert.equal(out.init.success, false, `${name}=${value} was accepted`)
    assert.match(out.init.error, new RegExp(name))
  }
})

test('a bad limits option (rpm: -1, rpd: 0, tpm: 1.5, rpm: NaN) makes initialize fail with a clear error, no throw', async () => {
  for (const limits of [{ rpm: -1 }, { rpd: 0 }, { tpm: 1.5 }, { rpm: NaN }, { rpm: Infinity }]) {
    const m = new ApiKeyManagerService({ keys: [K[0]], limits, quiet: true })
    const r = await settle(() => m.initialize())
    assertFailure(assert, r)
    const name = Object.keys(limits)[0]
    assert.match(r.error, new RegExp(`limits\\.${name}`), `${JSON.stringify(limits)} -> ${r.error}`)
    assertFailure(assert, await settle(() => m.getBestAvailableKey()))
  }
})

test('a limits option of the wrong type (rpm: "60") is refused without a throw', async () => {
  const m = new ApiKeyManagerService({ keys: [K[0]], limits: { rpm: '60' }, quiet: true })
  assertFailure(assert, await settle(() => m.initialize()))
})

test('MONGODB_URI pointing at a server that cannot be reached: the service still runs in memory', () => {
  const out = expectClean(
    fromEnv({ GEMINI_API_KEY_1: K[0], GEMINI_API_KEY_2: K[1], MONGODB_URI: 'mongodb://127.0.0.1:1/', MONGODB_DB_NAME: 'rag_db' }),
    assert,
  )
  assert.equal(out.init.success, true)
  assert.deepEqual(out.init.metadata, { totalKeys: 2, mode: 'in-memory' })
  assert.equal(out.best.success, true)
})
