'use strict'

// Issue 4 point 6: manager.execute(call, { estimatedTokens, maxAttempts, maxWaitMs }), and the
// 429 handling it builds on (handleRateLimit's retryAfterMs, Gemini's 429 body given to
// recordUsage, nextAvailableAt), against the fake Gemini server of fixtures/fake-gemini.js.

const test = require('node:test')
const assert = require('node:assert/strict')
const { PKG, fakeKey, statusOf } = require('./helpers')
const { startFakeGemini, callGemini, retryDelayMs, QUOTAS, QUOTA_MESSAGE } = require('./fixtures/fake-gemini')

const { ApiKeyManagerService } = require(PKG)

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const keysOf = (n) => Array.from({ length: n }, (_, i) => fakeKey(i + 1))

/** A quiet manager over `n` keys; limits default to Flash-Lite's. */
function manager(n, { limits = { rpm: 30, rpd: 200, tpm: 1_000_000 }, windowMs } = {}) {
  const keys = keysOf(n)
  return { m: new ApiKeyManagerService({ keys, limits, windowMs, quiet: true }), keys }
}

/** A fake server for one test, closed when the test ends. */
async function fakeServer(t, options) {
  const server = await startFakeGemini(options)
  t.after(() => server.close())
  return server
}

/** Uses up `key`'s requests on the server directly (another client of the same key). */
async function useUp(server, key) {
  for (let i = 0; i < server.limits.rpm; i++) await callGemini(server.url, key)
}

/** Whatever `fn` rejects with (fails when it resolves). */
async function rejection(fn) {
  try {
    await fn()
  } catch (e) {
    return e
  }
  assert.fail('expected a rejection')
}

test("fake Gemini: rolling RPM per key, Google's 429 body with QuotaFailure and RetryInfo, key by header or ?key=", async (t) => {
  const server = await fakeServer(t, { limits: { rpm: 2, tpm: 1_000_000, rpd: 100 }, windowMs: 3_000 })
  const [a, b] = keysOf(2)
  const ok = await callGemini(server.url, a, { tokens: 321 })
  assert.deepEqual(ok.response.usageMetadata, { promptTokenCount: 193, candidatesTokenCount: 128, totalTokenCount: 321 })
  assert.equal(typeof ok.response.text(), 'string')
  await callGemini(server.url, a, { via: 'query' })
  const e = await rejection(() => callGemini(server.url, a))
  assert.equal(e.status, 429)
  assert.match(e.message, /\[429 Too Many Requests\]/)
  assert.ok(e.message.includes(QUOTA_MESSAGE))
  const [quotaFailure, , retryInfo] = e.errorDetails
  assert.equal(quotaFailure['@type'], 'type.googleapis.com/google.rpc.QuotaFailure')
  assert.deepEqual(quotaFailure.violations, [
    {
      quotaMetric: QUOTAS.rpm.quotaMetric,
      quotaId: 'GenerateRequestsPerMinutePerProjectPerModel-FreeTier',
      quotaDimensions: { location: 'global', model: 'gemini-2.0-flash-lite' },
      quotaValue: '2',
    },
  ])
  assert.equal(retryInfo['@type'], 'type.googleapis.com/google.rpc.RetryInfo')
  // Seconds until the oldest counted request leaves, rounded up: the window is 3 s.
  assert.equal(retryInfo.retryDelay, '3s')
  // Another key has its own window.
  await callGemini(server.url, b)
  assert.equal(server.accepted(a).length, 2)
  assert.equal(server.rateLimited(a).length, 1)
  assert.equal(server.accepted(b).length, 1)
  assert.equal(server.maxInWindow(a), 2)

  // TPM and RPD have their own quota ids.
  const tokens = await fakeServer(t, { limits: { rpm: 100, tpm: 1_000, rpd: 3 } })
  await callGemini(tokens.url, a, { tokens: 900 })
  const tpm = await rejection(() => callGemini(tokens.url, a, { tokens: 200 }))
  assert.equal(tpm.errorDetails[0].violations[0].quotaId, 'GenerateContentInputTokensPerModelPerMinute-FreeTier')
  await callGemini(tokens.url, a, { tokens: 100 })
  await callGemini(tokens.url, b, { tokens: 1 })
  await callGemini(tokens.url, b, { tokens: 1 })
  await callGemini(tokens.url, b, { tokens: 1 })
  const rpd = await rejection(() => callGemini(tokens.url, b, { tokens: 1 }))
  assert.equal(rpd.errorDetails[0].violations[0].quotaId, 'GenerateRequestsPerDayPerProjectPerModel-FreeTier')
  assert.ok(retryDelayMs(rpd) > 86_000_000)
})

test('execute records the tokens of usageMetadata (tpm.current is their sum, each request counted once) and the latency', async (t) => {
  const server = await fakeServer(t, { latencyMs: 30 })
  const { m, keys } = manager(1)
  // The latency execute measures goes to the recording of the call; nothing else shows it in
  // memory mode, so it is read where it is recorded.
  const recorded = []
  const record = m._recordUsage.bind(m)
  m._recordUsage = (...args) => {
    recorded.push(args)
    return record(...args)
  }
  let sum = 0
  for (const tokens of [300, 450, 125]) {
    const result = await m.execute((key) => callGemini(server.url, key, { tokens }), { estimatedTokens: 1_000 })
    assert.equal(result.response.usageMetadata.totalTokenCount, tokens)
    sum += tokens
  }
  const s = await statusOf(m, keys[0])
  assert.equal(s.limits.tpm.current, sum, 'the estimates were replaced by the real counts')
  assert.equal(s.limits.rpm.current, 3)
  assert.equal(s.limits.rpd.current, 3)
  assert.equal(s.errorCount, 0)
  assert.equal(recorded.length, 3)
  for (const [key, tokens, success, , responseTime] of recorded) {
    assert.equal(key, keys[0])
    assert.equal(success, true)
    assert.ok([300, 450, 125].includes(tokens))
    // The server waited 30 ms before answering each call.
    assert.ok(typeof responseTime === 'number' && responseTime >= 29, `responseTime ${responseTime}`)
  }

  // A result without usageMetadata counts the estimate.
  await m.execute(async () => 'no usage here', { estimatedTokens: 77 })
  assert.equal((await statusOf(m, keys[0])).limits.tpm.current, sum + 77)
})

test('execute on a 429 rotates to another key and succeeds; the 429 key rests, still active', async (t) => {
  const server = await fakeServer(t, { limits: { rpm: 1, tpm: 1_000_000, rpd: 100 } })
  // The manager believes in 30 RPM: only the server knows the key is used up.
  const { m, keys } = manager(2)
  const tried = []
  const errors = []
  const result = await m.execute(async (key) => {
    tried.push(key)
    // Whichever key comes first, another client of it has just used its one request upstream.
    if (tried.length === 1) await useUp(server, key)
    try {
      return await callGemini(server.url, key, { tokens: 500 })
    } catch (e) {
      errors.push(e)
      throw e
    }
  })
  assert.equal(result.response.usageMetadata.totalTokenCount, 500)
  assert.equal(tried.length, 2)
  assert.notEqual(tried[1], tried[0])
  assert.equal(errors.length, 1)
  assert.equal(errors[0].status, 429)
  const rested = await statusOf(m, tried[0])
  assert.equal(rested.state, 'resting')
  assert.equal(rested.isActive, true)
  assert.ok(rested.stateUntil.getTime() > Date.now())
  const used = await statusOf(m, tried[1])
  assert.equal(used.state, 'active')
  assert.equal(used.limits.tpm.current, 500)
  assert.deepEqual(new Set(tried), new Set(keys))
})

test("execute on a 503 waits out the model's back-off (within maxWaitMs), then tries again; the key is not blamed", async (t) => {
  const server = await fakeServer(t)
  const { m } = manager(2)
  const tried = []
  server.failNext('*', 503)
  const result = await m.execute(
    (key) => {
      tried.push({ key, at: Date.now() })
      return callGemini(server.url, key, { tokens: 10 })
    },
    { maxWaitMs: 3_000 },
  )
  assert.equal(result.response.usageMetadata.totalTokenCount, 10)
  assert.equal(tried.length, 2)
  assert.ok(tried[1].at - tried[0].at >= 700, `the model backed off ${tried[1].at - tried[0].at} ms`)
  const s = await statusOf(m, tried[0].key)
  assert.equal(s.errorCount, 1)
  assert.equal(s.state, 'active', "an overload is the model's, not the key's")
})

test('execute rejects with the last error the call threw (not a wrapper) when maxAttempts run out', async (t) => {
  const server = await fakeServer(t, { limits: { rpm: 1, tpm: 1_000_000, rpd: 100 } })
  const { m, keys } = manager(3)
  for (const key of keys) await useUp(server, key)
  const thrown = []
  const e = await rejection(() =>
    m.execute(
      async (key) => {
        try {
          return await callGemini(server.url, key)
        } catch (err) {
          thrown.push(err)
          throw err
        }
      },
      { maxAttempts: 2 },
    ),
  )
  assert.equal(thrown.length, 2)
  assert.equal(e, thrown[1])
  assert.equal(e.status, 429)
  assert.ok(Array.isArray(e.errorDetails))
  for (const key of keys) assert.equal((await statusOf(m, key)).isActive, true)
})

test('execute rejects with the last error when the keys run out before maxAttempts', async (t) => {
  const server = await fakeServer(t, { limits: { rpm: 1, tpm: 1_000_000, rpd: 100 } })
  const { m, keys } = manager(2)
  for (const key of keys) await useUp(server, key)
  const thrown = []
  const e = await rejection(() =>
    m.execute(
      (key) =>
        callGemini(server.url, key).catch((err) => {
          thrown.push(err)
          throw err
        }),
      { maxAttempts: 5 },
    ),
  )
  // Both keys rest for Gemini's retryDelay (a minute here): there is no third key to try.
  assert.equal(thrown.length, 2)
  assert.equal(e, thrown[1])
})

test('execute does not retry a non-retryable error (400): it rejects with it after one attempt', async (t) => {
  const server = await fakeServer(t)
  const { m } = manager(3)
  const tried = []
  const thrown = []
  const e = await rejection(() =>
    m.execute(
      (key) => {
        tried.push(key)
        return callGemini(server.url, key, { body: {} }).catch((err) => {
          thrown.push(err)
          throw err
        })
      },
      { maxAttempts: 3 },
    ),
  )
  assert.equal(tried.length, 1)
  assert.equal(e, thrown[0])
  assert.equal(e.status, 400)
  const s = await statusOf(m, tried[0])
  assert.equal(s.isActive, true)
  assert.equal(s.errorCount, 1)
})

test('execute with every key busy: without maxWaitMs it fails at once with nextAvailableAt; with it, it waits and succeeds', async (t) => {
  const windowMs = 1_200
  const limits = { rpm: 1, tpm: 1_000_000, rpd: 100 }
  const server = await fakeServer(t, { limits, windowMs })
  const { m, keys } = manager(2, { limits, windowMs })
  const call = (key) => callGemini(server.url, key, { tokens: 100 })
  await m.execute(call)
  await m.execute(call)

  const busy = await rejection(() => m.execute(call))
  assert.equal(busy.message, 'No active API keys available')
  assert.ok(busy.metadata.nextAvailableAt instanceof Date)
  assert.ok(busy.metadata.nextAvailableAt.getTime() > Date.now())

  const result = await m.execute(call, { maxWaitMs: 3 * windowMs })
  assert.equal(result.response.usageMetadata.totalTokenCount, 100)
  const totals = server.totals()
  assert.equal(totals.rateLimited, 0, 'the wait kept the caller out of a 429')
  assert.equal(totals.accepted, 3)
  // The third request went out only once its key's window had room again.
  const reused = keys.find((k) => server.accepted(k).length === 2)
  const [first, second] = server.accepted(reused)
  assert.ok(second.at - first.at >= windowMs, `${second.at - first.at} ms apart`)
})

test('getBestAvailableKey failure: metadata.nextAvailableAt is a future Date when keys are only busy, absent when none will come back', async () => {
  // A multiple of 120 ms (the window's slices): see the bug test at the end of this file.
  const windowMs = 1_200
  const { m, keys } = manager(2, { limits: { rpm: 1, tpm: 1_000_000, rpd: 100 }, windowMs })
  const before = Date.now()
  assert.equal((await m.getBestAvailableKey()).success, true)
  assert.equal((await m.getBestAvailableKey()).success, true)
  const r = await m.getBestAvailableKey()
  assert.equal(r.success, false)
  assert.equal(r.error, 'No active API keys available')
  const at = r.metadata.nextAvailableAt
  assert.ok(at instanceof Date)
  assert.ok(at.getTime() > Date.now(), `${at.toISOString()} is not in the future`)
  // A request is counted for the span, at most one slice (1/120 of it) and a 10 ms margin more.
  assert.ok(at.getTime() <= Date.now() + windowMs + Math.ceil(windowMs / 120) + 10, `${at.getTime() - before} ms`)

  for (const key of keys) await m.recordUsage(key, 0, false, '[403 Forbidden] PERMISSION_DENIED')
  const none = await m.getBestAvailableKey()
  assert.equal(none.success, false)
  assert.equal(none.metadata.nextAvailableAt, undefined)
})

test("handleRateLimit(key, 'RPM', { retryAfterMs: 500 }) rests the key about 500 ms", async () => {
  const { m, keys } = manager(1)
  const before = Date.now()
  const r = await m.handleRateLimit(keys[0], 'RPM', { retryAfterMs: 500 })
  const after = Date.now()
  assert.equal(r.success, true)
  const s = await statusOf(m, keys[0])
  assert.equal(s.state, 'resting')
  assert.equal(s.isActive, true)
  // The core's clock is coarse (a few ms behind Date.now()).
  const until = s.stateUntil.getTime()
  assert.ok(until >= before + 500 - 10 && until <= after + 500, `rests until +${until - before} ms`)
  const busy = await m.getBestAvailableKey()
  assert.equal(busy.success, false)
  assert.equal(busy.metadata.nextAvailableAt.getTime(), until)
  await sleep(until - Date.now() + 20)
  const back = await m.getBestAvailableKey()
  assert.equal(back.success, true)
  assert.equal((await statusOf(m, keys[0])).state, 'active')
})

test("a Gemini 429 given to recordUsage as the SDK's error rests the key for its retryDelay, and 30 of them never deactivate it", async (t) => {
  // Upstream windows of 7 s: retryDelay "7s", far shorter than the manager's own minute.
  const server = await fakeServer(t, { limits: { rpm: 1, tpm: 1_000_000, rpd: 1_000 }, windowMs: 7_000 })
  const { m, keys } = manager(2)
  await callGemini(server.url, keys[0])
  const e = await rejection(() => callGemini(server.url, keys[0]))
  assert.equal(e.status, 429)
  const delay = retryDelayMs(e)
  assert.equal(delay, 7_000)

  const before = Date.now()
  assert.equal((await m.recordUsage(keys[0], 0, false, e, 5)).success, true)
  const after = Date.now()
  let s = await statusOf(m, keys[0])
  assert.equal(s.state, 'resting')
  assert.equal(s.isActive, true)
  const until = s.stateUntil.getTime()
  assert.ok(until >= before + delay - 10 && until <= after + delay, `rests for ${until - before} ms, retryDelay ${delay} ms`)
  const rpm = (await m.getRateLimitInfo(keys[0])).data.find((i) => i.type === 'RPM')
  assert.equal(rpm.isLimited, true)

  for (let i = 0; i < 30; i++) await m.recordUsage(keys[0], 0, false, e, 5)
  s = await statusOf(m, keys[0])
  assert.equal(s.isActive, true)
  assert.equal(s.state, 'resting', 'never circuit-open nor deactivated')
  assert.equal((await m.getAllKeysStatus()).metadata.activeKeys, 2)
  const picked = await m.getBestAvailableKey()
  assert.equal(picked.data[0], keys[1])
})

test("a Gemini TPM 429 rests the key on its TPM window", async (t) => {
  const server = await fakeServer(t, { limits: { rpm: 100, tpm: 1_000, rpd: 1_000 }, windowMs: 5_000 })
  const { m, keys } = manager(1)
  await callGemini(server.url, keys[0], { tokens: 1_000 })
  const e = await rejection(() => callGemini(server.url, keys[0], { tokens: 1 }))
  await m.recordUsage(keys[0], 0, false, e)
  const info = (await m.getRateLimitInfo(keys[0])).data
  assert.deepEqual(
    info.map((i) => [i.type, i.isLimited]),
    [
      ['RPM', false],
      ['RPD', false],
      ['TPM', true],
    ],
  )
})

// Bugs found while writing these tests, kept as regression tests: execute with maxAttempts 0 rejected
// with undefined; nextAvailableAt said "now" for an estimate no key can ever take; a window whose span
// is not a multiple of 120 ms was counted over 120 rounded-up slices (1,080 ms for 1,000).

test('execute with maxAttempts: 0 rejects with an Error, not with undefined', async () => {
  const { m } = manager(1)
  let called = false
  const e = await rejection(() =>
    m.execute(
      async () => {
        called = true
      },
      { maxAttempts: 0 },
    ),
  )
  assert.equal(called, false)
  assert.ok(e instanceof Error, `rejected with ${e}`)
})

test('nextAvailableAt is never a time at which the selection would have succeeded: an estimate above every TPM limit gets none', async () => {
  const { m } = manager(2, { limits: { rpm: 30, tpm: 1_000, rpd: 100 } })
  const before = Date.now()
  const r = await m.getBestAvailableKey({ estimatedTokens: 5_000 })
  assert.equal(r.success, false)
  const at = r.metadata.nextAvailableAt
  // No key can ever take 5,000 tokens in a minute: "available at <now>" is false.
  assert.ok(at === undefined || at.getTime() > before, `nextAvailableAt ${at && at.getTime() - before} ms from now`)
})

test('a rolling window whose span is not a multiple of 120 ms counts a request for the span plus at most a slice and the margin', async () => {
  // 1,000 ms in 120 slices: 9 ms slices (rounded up). A request must leave the window 1,000 ms
  // after its slice ends (plus the 10 ms margin), not after 120 slices of 9 ms = 1,080 ms.
  const windowMs = 1_000
  const { m } = manager(1, { limits: { rpm: 1, tpm: 1_000_000, rpd: 100 }, windowMs })
  const before = Date.now()
  assert.equal((await m.getBestAvailableKey()).success, true)
  const at = (await m.getBestAvailableKey()).metadata.nextAvailableAt
  assert.ok(at instanceof Date)
  const bound = windowMs + Math.ceil(windowMs / 120) + 10
  assert.ok(at.getTime() - before <= bound, `frees ${at.getTime() - before} ms after hand-out, more than ${bound}`)
})
