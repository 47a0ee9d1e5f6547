'use strict'

// Bad input: every call resolves to { success: false, error } and never throws or rejects, and a
// refused call changes nothing.

const test = require('node:test')
const assert = require('node:assert/strict')
const { newManager, settle, assertFailure, statusOf, fakeKey } = require('./helpers')

const UNKNOWN = fakeKey(999)

/** Every method that takes a key, called with `key` (and otherwise valid arguments). */
function keyedCalls(m, key) {
  return {
    'recordUsage(success)': () => m.recordUsage(key, 10, true, undefined, 5),
    'recordUsage(failure)': () => m.recordUsage(key, 10, false, 'HTTP 500', 5),
    handleRateLimit: () => m.handleRateLimit(key, 'RPM'),
    getRateLimitInfo: () => m.getRateLimitInfo(key),
    reactivateKey: () => m.reactivateKey(key),
  }
}

async function countersOf(m, key) {
  const s = await statusOf(m, key)
  return {
    rpm: s.limits.rpm.current,
    rpd: s.limits.rpd.current,
    tpm: s.limits.tpm.current,
    errorCount: s.errorCount,
    isActive: s.isActive,
  }
}

test("an unknown key gives 'API key not found' from every keyed method", async () => {
  const { m } = newManager(2)
  for (const [name, call] of Object.entries(keyedCalls(m, UNKNOWN))) {
    assertFailure(assert, await settle(call), 'API key not found')
    assert.ok(name)
  }
})

test('a key that differs only by whitespace or case is not found', async () => {
  const { m, keys } = newManager(1)
  for (const key of [` ${keys[0]}`, keys[0].toLowerCase(), keys[0].slice(0, -1), '']) {
    assertFailure(assert, await settle(() => m.recordUsage(key, 1, true)), 'API key not found')
  }
})

test('a non-string key (number, undefined, null, object, array) is refused by every keyed method', async () => {
  const { m } = newManager(2)
  for (const key of [42, undefined, null, {}, { apiKey: fakeKey(1) }, [fakeKey(1)], true]) {
    for (const [name, call] of Object.entries(keyedCalls(m, key))) {
      const r = await settle(call)
      assertFailure(assert, r)
      assert.ok(name)
    }
  }
})

test('tokensUsed negative, NaN, fractional, huge, Infinity or a string is refused and counts nothing', async () => {
  const { m, keys } = newManager(1)
  const before = await countersOf(m, keys[0])
  for (const tokens of [-1, NaN, 1.5, 1e20, Infinity, -Infinity, '12', undefined, null, {}, 10n]) {
    const r = await settle(() => m.recordUsage(keys[0], tokens, true, undefined, 5))
    assertFailure(assert, r)
    assert.match(r.error, /tokensUsed/, `tokensUsed ${String(tokens)}: ${r.error}`)
  }
  assert.deepEqual(await countersOf(m, keys[0]), before)
})

test('a failure reported with a bad tokensUsed never throws or rejects', async () => {
  const { m, keys } = newManager(1)
  for (const tokens of [-1, NaN, 1.5, 1e20, Infinity, '12', undefined, null]) {
    const r = await settle(() => m.recordUsage(keys[0], tokens, false, 'HTTP 500', 5))
    assert.equal(typeof r.success, 'boolean')
    assert.equal(typeof r.metadata, 'object')
    if (!r.success) assert.equal(typeof r.error, 'string')
  }
  assert.equal((await countersOf(m, keys[0])).tpm, 0, 'a failure never adds tokens')
})

test('recordUsage(success=false) with tokensUsed undefined (a failed call has no usage metadata) still counts the error', async () => {
  // A JS caller's catch block typically passes `response?.usageMetadata?.totalTokenCount`, which is
  // undefined when the Gemini call failed. The old service counted the error regardless of tokensUsed
  // (SPEC section 2: error count +1, lastError, lastErrorTime), so a refusal here would silently
  // disable the health rules (here: 3 timeouts in a row open the key's circuit) for such callers.
  const { m, keys } = newManager(2)
  const r = await settle(() => m.recordUsage(keys[0], undefined, false, 'request timed out', 900))
  assert.equal(r.success, true, `refused: ${r.error}`)
  const s = await statusOf(m, keys[0])
  assert.equal(s.errorCount, 1)
  assert.equal(s.lastError, 'request timed out')
  for (let i = 0; i < 2; i++) await m.recordUsage(keys[0], undefined, false, 'request timed out', 900)
  assert.equal((await statusOf(m, keys[0])).state, 'circuit-open')
})

test('tokensUsed 0 and a large whole number are accepted', async () => {
  const { m, keys } = newManager(1)
  assert.equal((await m.recordUsage(keys[0], 0, true)).success, true)
  assert.equal((await m.recordUsage(keys[0], 1000000, true)).success, true)
  assert.equal((await statusOf(m, keys[0])).limits.tpm.current, 1000000)
})

test("an unknown limitType ('XPM', 'rpm', undefined, 1) is refused and marks nothing", async () => {
  const { m, keys } = newManager(1)
  const before = await countersOf(m, keys[0])
  for (const type of ['XPM', 'rpm', '', undefined, null, 1]) {
    const r = await settle(() => m.handleRateLimit(keys[0], type))
    assertFailure(assert, r)
    assert.match(r.error, /limitType|RPM/, `limitType ${String(type)}: ${r.error}`)
  }
  assert.deepEqual(await countersOf(m, keys[0]), before)
  assert.equal((await m.getRateLimitInfo(keys[0])).data.some((i) => i.isLimited), false)
})

test('recordUsage without tokensUsed or with odd error / responseTime values does not throw', async () => {
  const { m, keys } = newManager(1)
  const bare = await settle(() => m.recordUsage(keys[0]))
  assert.equal(typeof bare.success, 'boolean')
  assert.equal(typeof bare.metadata, 'object')
  // error and responseTime are optional and informational
  for (const [error, responseTime] of [[undefined, undefined], [null, -1], [{ code: 503 }, NaN], [new Error('boom'), '12']]) {
    const r = await settle(() => m.recordUsage(keys[0], 1, false, error, responseTime))
    assert.equal(typeof r.success, 'boolean')
    assert.equal(typeof r.metadata, 'object')
  }
})

test("every method after close() gives 'API key manager is closed'", async () => {
  const { m, keys } = newManager(2)
  assert.equal((await m.getBestAvailableKey()).success, true)
  assert.equal(await m.close(), undefined)
  const calls = {
    initialize: () => m.initialize(),
    getBestAvailableKey: () => m.getBestAvailableKey(),
    getNextKeyForRotation: () => m.getNextKeyForRotation(),
    getAllKeysStatus: () => m.getAllKeysStatus(),
    resetAllLimits: () => m.resetAllLimits(),
    refreshCache: () => m.refreshCache(),
    ...keyedCalls(m, keys[0]),
  }
  for (const [name, call] of Object.entries(calls)) {
    const r = await settle(call)
    assertFailure(assert, r)
    assert.equal(r.error, 'API key manager is closed', `${name}: ${r.error}`)
  }
})

test('close() on a manager that was never used, then every method: closed, no throw', async () => {
  const { m, keys } = newManager(1)
  await m.close()
  assertFailure(assert, await settle(() => m.initialize()), 'API key manager is closed')
  assertFailure(assert, await settle(() => m.getBestAvailableKey()), 'API key manager is closed')
  assertFailure(assert, await settle(() => m.recordUsage(keys[0], 1, true)), 'API key manager is closed')
})

test('close() twice is fine', async () => {
  const { m } = newManager(1)
  await m.initialize()
  const first = m.close()
  assert.ok(first instanceof Promise)
  assert.equal(await first, undefined)
  assert.equal(await settle(() => m.close()), undefined)
})

test('closing one manager leaves another manager with the same keys working', async () => {
  const a = newManager(2)
  const b = newManager(2)
  await a.m.close()
  assert.equal((await b.m.getBestAvailableKey()).success, true)
  assert.equal((await b.m.recordUsage(b.keys[0], 1, true)).success, true)
})

test('options with keys of the wrong type are refused by initialize, not thrown', async () => {
  const { ApiKeyManagerService } = require('..')
  for (const keys of [[42], 'AIzaSy-not-a-list', [fakeKey(1), null]]) {
    const m = new ApiKeyManagerService({ keys, quiet: true })
    assertFailure(assert, await settle(() => m.initialize()))
    assertFailure(assert, await settle(() => m.getBestAvailableKey()))
  }
})

test('an error thrown across the native boundary says whose fault it was: InvalidArg for bad input, GenericFailure otherwise', async (t) => {
  const { keyFingerprint } = require('..')
  assert.throws(() => keyFingerprint(42), { code: 'InvalidArg', message: 'apiKey must be a string' })
  assert.throws(() => keyFingerprint(fakeKey(1), 'short'), { code: 'InvalidArg', message: /at least 16 bytes/ })
  const { m } = newManager(1)
  await assert.rejects(m.serve({ port: -1 }), { code: 'InvalidArg', message: /port must be an integer/ })
  await assert.rejects(m.serve({ host: '127.0.0.1', port: 0, maxConnections: 0 }), { code: 'InvalidArg' })
  const server = await m.serve({ host: '127.0.0.1', port: 0 })
  t.after(async () => {
    await server.close()
    await m.close()
  })
  // The port is taken: no fault of the arguments.
  await assert.rejects(m.serve({ host: '127.0.0.1', port: server.port }), { code: 'GenericFailure', message: /cannot listen/ })
})
