'use strict'

// SPEC section 2: selection, scoring, usage accounting, health, rate limits, resets, rotation.
// Every test builds its own quiet manager with explicit limits.

const test = require('node:test')
const assert = require('node:assert/strict')
const { newManager, assertFailure, pick, statusOf, fakeKey } = require('./helpers')

const close = (a, b, eps = 1e-9) => Math.abs(a - b) <= eps

function expectedScore(s) {
  const remaining = (w) => Math.max(0, w.limit - w.current) / w.limit
  return 0.5 * remaining(s.limits.rpm) + 0.3 * remaining(s.limits.rpd) + 0.2 * remaining(s.limits.tpm)
}

test("getBestAvailableKey: rotationMethod is 'round-robin' on the first call, then 'cached-round-robin'", async () => {
  const { m } = newManager(3)
  const first = await m.getBestAvailableKey()
  const second = await m.getBestAvailableKey()
  const third = await m.getBestAvailableKey()
  assert.equal(first.metadata.rotationMethod, 'round-robin')
  assert.equal(second.metadata.rotationMethod, 'cached-round-robin')
  assert.equal(third.metadata.rotationMethod, 'cached-round-robin')
  for (const r of [first, second, third]) assert.equal(r.metadata.totalAvailable, 3)
})

test('getBestAvailableKey hands keys out round-robin, every key once per round', async () => {
  const { m, keys } = newManager(3)
  const handed = await pick(m, 6)
  assert.deepEqual(new Set(handed.slice(0, 3)), new Set(keys))
  assert.deepEqual(handed.slice(3), handed.slice(0, 3))
})

test('getBestAvailableKey sets lastUsed on the chosen key, and only on it', async () => {
  const { m, keys } = newManager(2)
  const before = new Map((await m.initialize()).data.keys.map((s) => [s.apiKey, s.lastUsed.getTime()]))
  // 10 ms: more than the core's coarse clock tick, so "now" has moved on; not a timing assertion.
  await new Promise((resolve) => setTimeout(resolve, 10))
  const r = await m.getBestAvailableKey()
  const [chosen, status] = r.data
  const other = keys.find((k) => k !== chosen)
  assert.ok(status.lastUsed instanceof Date)
  assert.ok(status.lastUsed.getTime() > before.get(chosen), `${status.lastUsed.toISOString()} not after ${before.get(chosen)}`)
  assert.ok(status.lastUsed.getTime() <= Date.now() + 1000)
  assert.equal((await statusOf(m, other)).lastUsed.getTime(), before.get(other))
})

test('availabilityScore = 0.5 x remaining RPM + 0.3 x remaining RPD + 0.2 x remaining TPM', async () => {
  const { m, keys } = newManager(1, { rpm: 10, rpd: 100, tpm: 1000 })
  assert.equal((await m.getBestAvailableKey()).metadata.availabilityScore, 1)
  await m.recordUsage(keys[0], 100, true, undefined, 10)
  await m.recordUsage(keys[0], 150, true, undefined, 10)
  // Status objects are live: score a snapshot taken before the hand-out reserves the key.
  const before = structuredClone(await statusOf(m, keys[0]))
  const r = await m.getBestAvailableKey()
  // The first hand-out and its recordUsage count once, the second recordUsage anew:
  // rpm 2/10, rpd 2/100, tpm 250/1000 (the score is the key's before this hand-out reserves it).
  const want = 0.5 * 0.8 + 0.3 * 0.98 + 0.2 * 0.75
  assert.ok(close(r.metadata.availabilityScore, want), `${r.metadata.availabilityScore} != ${want}`)
  assert.ok(close(r.metadata.availabilityScore, expectedScore(before)))
})

test('the cache is ordered by score: a fresher key is handed out before a used one after a rebuild', async () => {
  const { m, keys } = newManager(3, { rpm: 10, rpd: 100, tpm: 1000 })
  await m.recordUsage(keys[0], 0, true)
  await m.recordUsage(keys[0], 0, true)
  await m.recordUsage(keys[1], 0, true)
  await m.refreshCache()
  const order = await pick(m, 3)
  assert.deepEqual(order, [keys[2], keys[1], keys[0]])
})

test('recordUsage(success) adds 1 to RPM and RPD, tokensUsed to TPM, and resets errorCount and lastError', async () => {
  const { m, keys } = newManager(2)
  await m.recordUsage(keys[0], 0, false, 'HTTP 500', 20)
  await m.recordUsage(keys[0], 0, false, 'HTTP 502', 20)
  let s = await statusOf(m, keys[0])
  assert.equal(s.errorCount, 2)
  assert.equal(s.lastError, 'HTTP 502')

  assert.equal((await m.recordUsage(keys[0], 250, true, undefined, 80)).success, true)
  assert.equal((await m.recordUsage(keys[0], 750, true, undefined, 80)).success, true)
  s = await statusOf(m, keys[0])
  assert.equal(s.limits.rpm.current, 2)
  assert.equal(s.limits.rpd.current, 2)
  assert.equal(s.limits.tpm.current, 1000)
  assert.equal(s.errorCount, 0)
  assert.equal(s.lastError, undefined)

  const info = (await m.getRateLimitInfo(keys[0])).data
  assert.deepEqual(info.map((i) => i.current), [2, 2, 1000])
  const other = await statusOf(m, keys[1])
  assert.deepEqual([other.limits.rpm.current, other.limits.rpd.current, other.limits.tpm.current], [0, 0, 0])
})

test('recordUsage(failure) counts an error and keeps lastError and lastErrorTime, without counting a request', async () => {
  const { m, keys } = newManager(1)
  await m.recordUsage(keys[0], 0, false, 'HTTP 503', 20)
  const s = await statusOf(m, keys[0])
  assert.equal(s.errorCount, 1)
  assert.equal(s.lastError, 'HTTP 503')
  assert.ok(s.lastErrorTime instanceof Date)
  assert.equal(s.isActive, true)
  assert.deepEqual([s.limits.rpm.current, s.limits.rpd.current, s.limits.tpm.current], [0, 0, 0])
})

test('3 failures in a row that follow a key (timeouts, dropped connections) open its circuit: the key rests, still active; reactivateKey brings it back', async () => {
  const { m, keys } = newManager(2)
  const [weak, healthy] = keys
  for (let i = 0; i < 2; i++) await m.recordUsage(weak, 0, false, 'request timed out after 30000 ms', 10)
  assert.equal((await statusOf(m, weak)).state, 'active')
  await m.recordUsage(weak, 0, false, 'socket hang up', 10)
  let s = await statusOf(m, weak)
  assert.equal(s.isActive, true, 'server errors never deactivate a key')
  assert.equal(s.state, 'circuit-open')
  assert.ok(s.stateUntil instanceof Date && s.stateUntil.getTime() > Date.now())
  assert.equal(s.errorCount, 3)

  const handed = await pick(m, 4)
  assert.deepEqual(handed, [healthy, healthy, healthy, healthy])

  assert.equal((await m.reactivateKey(weak)).success, true)
  s = await statusOf(m, weak)
  assert.equal(s.state, 'active')
  assert.equal(s.errorCount, 0)
  assert.ok((await pick(m, 2)).includes(weak))
})

test('a key the API refuses (API_KEY_INVALID, 403) is deactivated until reactivateKey', async () => {
  const { m, keys } = newManager(2)
  const [bad, healthy] = keys
  await m.recordUsage(bad, undefined, false, new Error('[400 Bad Request] API key not valid. Please pass a valid API key. [API_KEY_INVALID]'))
  let s = await statusOf(m, bad)
  assert.equal(s.isActive, false)
  assert.equal(s.state, 'deactivated')
  assert.equal((await m.getAllKeysStatus()).metadata.activeKeys, 1)
  assert.deepEqual(await pick(m, 3), [healthy, healthy, healthy])
  assert.equal((await m.reactivateKey(bad)).success, true)
  s = await statusOf(m, bad)
  assert.equal(s.isActive, true)
  assert.equal(s.errorCount, 0)
})

test('429s never deactivate: ten in a row leave the key active, resting until the retryDelay', async () => {
  const { m, keys } = newManager(2)
  const body = JSON.stringify({
    error: {
      code: 429,
      status: 'RESOURCE_EXHAUSTED',
      details: [{ '@type': 'type.googleapis.com/google.rpc.RetryInfo', retryDelay: '30s' }],
    },
  })
  for (let i = 0; i < 10; i++) await m.recordUsage(keys[0], 0, false, body, 5)
  const s = await statusOf(m, keys[0])
  assert.equal(s.isActive, true)
  assert.equal(s.state, 'resting')
  const restMs = s.stateUntil.getTime() - Date.now()
  assert.ok(restMs > 20_000 && restMs <= 30_000, `${restMs}`)
  assert.deepEqual(await pick(m, 2), [keys[1], keys[1]])
})

test('a success between failures breaks the streak: 4 failures, 1 success, 4 failures leave the key active', async () => {
  const { m, keys } = newManager(1)
  for (let i = 0; i < 4; i++) await m.recordUsage(keys[0], 0, false, 'x', 1)
  await m.recordUsage(keys[0], 10, true, undefined, 1)
  for (let i = 0; i < 4; i++) await m.recordUsage(keys[0], 0, false, 'x', 1)
  const s = await statusOf(m, keys[0])
  assert.equal(s.isActive, true)
  assert.equal(s.errorCount, 4)
})

for (const type of ['RPM', 'RPD', 'TPM']) {
  test(`handleRateLimit('${type}') rests the key (isLimited, state 'resting'; a spent day counted full) and the key is skipped`, async () => {
    const { m, keys } = newManager(2)
    const [limited, other] = keys
    await m.getBestAvailableKey() // builds the cache with both keys
    const r = await m.handleRateLimit(limited, type)
    assert.equal(r.success, true)
    const info = (await m.getRateLimitInfo(limited)).data
    for (const i of info) {
      assert.equal(i.isLimited, i.type === type)
      // The first getBestAvailableKey reserved one request on one of the two keys; a spent day is
      // the whole day's limit (Gemini said so).
      if (type === 'RPD' && i.type === 'RPD') assert.equal(i.current, i.limit)
      else assert.ok(i.current <= 1)
    }
    const s = await statusOf(m, limited)
    assert.equal(s.state, 'resting')
    assert.ok(s.stateUntil.getTime() > Date.now())
    assert.equal(s.errorCount, 1, 'a rate limit is recorded as the last error')
    assert.deepEqual(await pick(m, 4), [other, other, other, other])
  })
}

test('resetAllLimits clears every counter and rest, and the keys are handed out again', async () => {
  const { m, keys } = newManager(2)
  await m.recordUsage(keys[0], 500, true, undefined, 5)
  await m.handleRateLimit(keys[0], 'RPM')
  await m.handleRateLimit(keys[1], 'RPD')
  assert.equal((await m.getBestAvailableKey()).success, false)

  assert.equal((await m.resetAllLimits()).success, true)
  for (const key of keys) {
    const info = (await m.getRateLimitInfo(key)).data
    assert.deepEqual(info.map((i) => [i.current, i.isLimited]), [[0, false], [0, false], [0, false]])
    const s = await statusOf(m, key)
    assert.deepEqual([s.limits.rpm.current, s.limits.rpd.current, s.limits.tpm.current], [0, 0, 0])
  }
  assert.deepEqual(new Set(await pick(m, 2)), new Set(keys))
})

test('refreshCache resolves to metadata { cacheRefreshed: true } and the next pick is served from the cache', async () => {
  const { m } = newManager(2)
  const r = await m.refreshCache()
  assert.equal(r.success, true)
  assert.equal(r.metadata.cacheRefreshed, true)
  assert.equal((await m.getBestAvailableKey()).metadata.rotationMethod, 'cached-round-robin')
})

test("getNextKeyForRotation: proactive rotation away from a nearly exhausted key (rotationReason 'proactive-rotation')", async () => {
  const { m, keys } = newManager(2, { rpm: 10, rpd: 10, tpm: 1000000 })
  const [weak, strong] = keys
  for (let i = 0; i < 9; i++) await m.recordUsage(weak, 100, true, undefined, 10)
  const weakScore = expectedScore(await statusOf(m, weak))
  assert.ok(weakScore < 0.3, `setup: weak key scores ${weakScore}`)

  const r = await m.getNextKeyForRotation()
  assert.equal(r.success, true)
  assert.equal(r.metadata.rotationReason, 'proactive-rotation')
  assert.equal(r.data[0], strong)
  assert.ok(r.metadata.availabilityScore > 0.3, `chosen key scores ${r.metadata.availabilityScore}`)
  assert.equal(typeof r.metadata.previousKeyScore, 'number')
  assert.ok(r.metadata.previousKeyScore < 0.3)
  assert.ok(close(r.metadata.previousKeyScore, weakScore))
})

test("getNextKeyForRotation without a weak key: rotationReason is a string other than 'proactive-rotation'", async () => {
  const { m, keys } = newManager(2)
  const r = await m.getNextKeyForRotation()
  assert.equal(r.success, true)
  assert.ok(keys.includes(r.data[0]))
  assert.equal(typeof r.metadata.rotationReason, 'string')
  assert.notEqual(r.metadata.rotationReason, 'proactive-rotation')
  assert.equal(r.metadata.availabilityScore, 1)
})

test('getNextKeyForRotation with only a weak key and nothing better still hands it out, not as proactive', async () => {
  const { m, keys } = newManager(1, { rpm: 10, rpd: 10, tpm: 1000000 })
  for (let i = 0; i < 9; i++) await m.recordUsage(keys[0], 0, true)
  const r = await m.getNextKeyForRotation()
  assert.equal(r.success, true)
  assert.equal(r.data[0], keys[0])
  assert.equal(typeof r.metadata.rotationReason, 'string')
  assert.notEqual(r.metadata.rotationReason, 'proactive-rotation')
})

test("all keys exhausted: getBestAvailableKey and getNextKeyForRotation give { success: false, error: 'No active API keys available' }", async () => {
  const { m, keys } = newManager(3)
  await m.handleRateLimit(keys[0], 'RPM')
  await m.handleRateLimit(keys[1], 'RPD')
  await m.handleRateLimit(keys[2], 'TPM')
  assertFailure(assert, await m.getBestAvailableKey(), 'No active API keys available')
  assertFailure(assert, await m.getNextKeyForRotation(), 'No active API keys available')
})

test("all keys deactivated: getBestAvailableKey gives 'No active API keys available'", async () => {
  const { m, keys } = newManager(2)
  for (const key of keys) for (let i = 0; i < 5; i++) await m.recordUsage(key, 0, false, 'HTTP 403', 1)
  assertFailure(assert, await m.getBestAvailableKey(), 'No active API keys available')
  assertFailure(assert, await m.getNextKeyForRotation(), 'No active API keys available')
})

test('getBestAvailableKey counts the request at hand-out: K keys at RPM L give out K x L, then none', async () => {
  const { m, keys } = newManager(3, { rpm: 4, rpd: 100, tpm: 1000000 })
  const results = await Promise.all(Array.from({ length: 40 }, () => m.getBestAvailableKey()))
  const handed = results.filter((r) => r.success).map((r) => r.data[0])
  assert.equal(handed.length, 12)
  for (const key of keys) assert.equal(handed.filter((k) => k === key).length, 4)
  // The recordUsage that follows settles the reservation: no double count.
  await m.recordUsage(handed[0], 10, true)
  assert.equal((await statusOf(m, handed[0])).limits.rpm.current, 4)
})

test('estimatedTokens reserves TPM, corrected by the real count', async () => {
  const { m, keys } = newManager(1, { rpm: 100, rpd: 100, tpm: 1000 })
  const r = await m.getBestAvailableKey({ estimatedTokens: 800 })
  assert.equal(r.data[1].limits.tpm.current, 800)
  assertFailure(assert, await m.getBestAvailableKey({ estimatedTokens: 300 }), 'No active API keys available')
  await m.recordUsage(keys[0], 120, true)
  assert.equal((await statusOf(m, keys[0])).limits.tpm.current, 120)
  await m.refreshCache()
  assert.equal((await m.getBestAvailableKey({ estimatedTokens: 300 })).success, true)
})

test('a key at its RPM limit through recordUsage is not handed out', async () => {
  const { m, keys } = newManager(2, { rpm: 3, rpd: 100, tpm: 1000000 })
  for (let i = 0; i < 3; i++) await m.recordUsage(keys[0], 1, true)
  assert.equal((await m.getRateLimitInfo(keys[0])).data[0].isLimited, true)
  assert.deepEqual(await pick(m, 3), [keys[1], keys[1], keys[1]])
})

test('keys are added, disabled, enabled and removed at run time; errors say what is wrong', async () => {
  const { m, keys } = newManager(3)
  const added = fakeKey(77)
  const r = await m.addKey(added)
  assert.equal(r.success, true, r.error)
  assert.equal(r.data.apiKey, added)
  assert.equal(r.data.state, 'active')
  assert.equal(r.metadata.totalKeys, keys.length + 1)
  const handed = new Set()
  for (let i = 0; i < 2 * (keys.length + 1); i++) handed.add((await m.getBestAvailableKey()).data[0])
  assert.ok(handed.has(added), 'the added key is handed out')
  assert.equal((await m.addKey(added)).error, 'API key already exists')
  assert.match((await m.addKey('')).error, /^Invalid API key: it is empty/)
  assert.match((await m.addKey('a,b')).error, /^Invalid API key: /)
  assert.match((await m.addKey(42)).error, /^Invalid API key: it must be a string/)
  assert.equal((await m.removeKey('AIzaSyNOTHERE000000000000000000000000000')).error, 'API key not found')

  assert.deepEqual(await m.disableKey(keys[0]), { success: true, metadata: { changed: true } })
  assert.equal((await m.disableKey(keys[0])).metadata.changed, false)
  const disabled = (await m.getAllKeysStatus()).data.find((s) => s.apiKey === keys[0])
  assert.equal(disabled.isActive, false)
  assert.equal(disabled.state, 'disabled')
  await m.refreshCache()
  for (let i = 0; i < 8; i++) assert.notEqual((await m.getBestAvailableKey()).data[0], keys[0])
  assert.equal((await m.enableKey(keys[0])).success, true)
  assert.equal((await m.getAllKeysStatus()).data.find((s) => s.apiKey === keys[0]).state, 'active')

  assert.equal((await m.removeKey(added)).success, true)
  const listed = (await m.getAllKeysStatus()).data.map((s) => s.apiKey)
  assert.deepEqual(listed, keys)
  assert.equal((await m.getRateLimitInfo(added)).error, 'API key not found')
  assert.equal((await m.initialize()).metadata.totalKeys, keys.length)
  // A call handed out before the removal still reports on it.
  assert.equal((await m.recordUsage(added, 5, true)).success, true)
  // Adding it again brings it back.
  assert.equal((await m.addKey(added)).success, true)
  assert.equal((await m.getAllKeysStatus()).data.length, keys.length + 1)
  await m.close()
})
