'use strict'

// Issue 13 point 5: the fake Gemini itself (fixtures/fake-gemini.js) counts as Google documents:
// per project across keys, per model, TPM on input tokens, RPD per Pacific day, zero quotas,
// Google's 429 bodies (a per-day one with a short, misleading retryDelay), overload spells; and
// the same through its own process (fixtures/fake-gemini-process.js).

const test = require('node:test')
const assert = require('node:assert/strict')
const { fakeKey } = require('./helpers')
const { startFakeGemini, callGemini, retryDelayMs, pacificDayStart, nextPacificMidnight, QUOTAS, QUOTA_MESSAGE } = require('./fixtures/fake-gemini')
const { startFakeGeminiProcess } = require('./fixtures/fake-gemini-process')

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const keysOf = (n, from = 1) => Array.from({ length: n }, (_, i) => fakeKey(from + i))
const FLASH = 'gemini-2.0-flash'
const LITE = 'gemini-2.0-flash-lite'
// Counting as Google does (what the old tests pinned otherwise is opt-in).
const GOOGLE = { tpmCounts: 'input', day: 'pacific' }

async function fakeServer(t, options) {
  const server = await startFakeGemini(options)
  t.after(() => server.close())
  return server
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

const detail = (e, type) => e.errorDetails.find((d) => d['@type'] === `type.googleapis.com/google.rpc.${type}`)

test('keys of one project share its budget; a key not listed is a project of its own', async (t) => {
  const [a, b, c] = keysOf(3)
  const server = await fakeServer(t, { ...GOOGLE, limits: { rpm: 3, tpm: 1e9, rpd: 1e6 }, projects: { [a]: '1001', [b]: '1001' } })
  assert.equal(server.projectOf(a), '1001')
  assert.match(server.projectOf(c), /^\d{12}$/)
  assert.equal(server.projectOf(c), server.projectOf(c), 'stable')
  await callGemini(server.url, a, { model: FLASH })
  await callGemini(server.url, b, { model: FLASH })
  await callGemini(server.url, a, { model: FLASH })
  // The project's third request was a's second: b's next is its project's fourth.
  const e = await rejection(() => callGemini(server.url, b, { model: FLASH }))
  assert.equal(e.status, 429)
  assert.equal(detail(e, 'QuotaFailure').violations[0].quotaId, 'GenerateRequestsPerMinutePerProjectPerModel-FreeTier')
  // c has its own.
  for (let i = 0; i < 3; i++) await callGemini(server.url, c, { model: FLASH })
  assert.equal(server.acceptedFor({ project: '1001', model: FLASH }).length, 3)
  assert.deepEqual(
    server.acceptedFor({ project: '1001' }).map((x) => x.apiKey),
    [a, b, a],
  )
  assert.equal(server.maxInWindowFor({ project: '1001', model: FLASH }), 3)
  const limited = server.rateLimitedFor({ project: '1001', model: FLASH })
  assert.equal(limited.length, 1)
  assert.equal(limited[0].apiKey, b)
  assert.deepEqual(limited[0].quotas, ['rpm'])
  assert.equal(server.rateLimited(b).length, 1, 'per key too')
  assert.equal(server.accepted(b).length, 1)
  assert.equal(server.usageFor({ project: '1001', model: FLASH }).requests, 3)
  assert.equal(server.usageFor({ apiKey: c, model: FLASH }).requests, 3)
})

test('each model has its own budget and limits on the same keys; a model not listed gets `limits`', async (t) => {
  const [a] = keysOf(1)
  const server = await fakeServer(t, { ...GOOGLE, limits: { rpm: 1, tpm: 1e9, rpd: 1e6 }, models: { [FLASH]: { rpm: 2 } } })
  assert.deepEqual(server.limitsFor(FLASH), { rpm: 2, tpm: 1e9, rpd: 1e6 })
  assert.deepEqual(server.limitsFor('gemini-2.5-flash'), { rpm: 1, tpm: 1e9, rpd: 1e6 })
  await callGemini(server.url, a, { model: FLASH })
  await callGemini(server.url, a, { model: FLASH })
  const e = await rejection(() => callGemini(server.url, a, { model: FLASH }))
  assert.deepEqual(detail(e, 'QuotaFailure').violations, [
    { quotaMetric: QUOTAS.rpm.quotaMetric, quotaId: QUOTAS.rpm.quotaId, quotaDimensions: { location: 'global', model: FLASH }, quotaValue: '2' },
  ])
  // The same key, another model: a budget of its own, at `limits`.
  await callGemini(server.url, a, { model: LITE })
  const lite = await rejection(() => callGemini(server.url, a, { model: LITE }))
  assert.equal(detail(lite, 'QuotaFailure').violations[0].quotaValue, '1')
  assert.equal(detail(lite, 'QuotaFailure').violations[0].quotaDimensions.model, LITE)
  assert.equal(server.acceptedFor({ model: FLASH }).length, 2)
  assert.equal(server.acceptedFor({ model: LITE }).length, 1)
  assert.equal(server.accepted(a).length, 3)
  assert.equal(server.rateLimitedFor({ model: LITE }).length, 1)
})

test('TPM counts input tokens (promptTokenCount) over the rolling minute', async (t) => {
  const [a] = keysOf(1)
  const server = await fakeServer(t, { ...GOOGLE, limits: { rpm: 100, tpm: 1_000, rpd: 1e6 }, windowMs: 1_500 })
  // 900 input of 5,000 total: the output does not count.
  const first = await callGemini(server.url, a, { tokens: 5_000, inputTokens: 900 })
  assert.deepEqual(first.response.usageMetadata, { promptTokenCount: 900, candidatesTokenCount: 4_100, totalTokenCount: 5_000 })
  await callGemini(server.url, a, { inputTokens: 100 })
  assert.equal(server.usageFor({ apiKey: a, model: LITE }).tokens, 1_000)
  const e = await rejection(() => callGemini(server.url, a, { inputTokens: 1 }))
  const v = detail(e, 'QuotaFailure').violations
  assert.deepEqual(v.map((x) => [x.quotaId, x.quotaValue]), [['GenerateContentInputTokensPerModelPerMinute-FreeTier', '1000']])
  assert.match(e.message, /Quota exceeded for metric: generativelanguage\.googleapis\.com\/generate_content_free_tier_input_token_count, limit: 1000, model: gemini-2\.0-flash-lite/)
  assert.deepEqual(server.rateLimitedFor({ quota: 'tpm' }).map((x) => x.quotas), [['tpm']])
  // Tokens named only as a total: 60% of them are input.
  const t60 = await startFakeGemini({ ...GOOGLE, limits: { rpm: 100, tpm: 600, rpd: 1e6 } })
  t.after(() => t60.close())
  const r = await callGemini(t60.url, a, { tokens: 1_000 })
  assert.equal(r.response.usageMetadata.promptTokenCount, 600)
  await rejection(() => callGemini(t60.url, a, { tokens: 2 }))
  // The minute rolls: the first request leaves it, then the second.
  await sleep(1_600)
  await callGemini(server.url, a, { inputTokens: 999 })
  // tpmCounts 'total' (the default) counts every token, as older tests expect.
  const total = await fakeServer(t, { limits: { rpm: 100, tpm: 1_000, rpd: 1e6 } })
  await callGemini(total.url, a, { tokens: 900 })
  await rejection(() => callGemini(total.url, a, { tokens: 200 }))
})

test('RPD per Pacific day: reset at midnight America/Los_Angeles (simulated by resetDayAt), DST included', async (t) => {
  // The calendar: PST is UTC-8, PDT UTC-7; the spring day is 23 h, the autumn one 25 h.
  const at = (iso) => Date.parse(iso)
  assert.equal(pacificDayStart(at('2025-01-15T12:00:00Z')), at('2025-01-15T08:00:00Z'))
  assert.equal(pacificDayStart(at('2025-01-15T07:59:59Z')), at('2025-01-14T08:00:00Z'))
  assert.equal(pacificDayStart(at('2025-07-01T06:59:59Z')), at('2025-06-30T07:00:00Z'))
  assert.equal(nextPacificMidnight(at('2025-03-09T12:00:00Z')), at('2025-03-10T07:00:00Z'))
  assert.equal(nextPacificMidnight(at('2025-03-09T12:00:00Z')) - pacificDayStart(at('2025-03-09T12:00:00Z')), 23 * 3_600_000)
  assert.equal(nextPacificMidnight(at('2025-11-02T12:00:00Z')) - pacificDayStart(at('2025-11-02T12:00:00Z')), 25 * 3_600_000)
  assert.equal(nextPacificMidnight(at('2025-11-03T07:59:59Z')), at('2025-11-03T08:00:00Z'))

  const [a, b] = keysOf(2)
  const server = await fakeServer(t, { ...GOOGLE, limits: { rpm: 100, tpm: 1e9, rpd: 2 }, projects: { [a]: '2001', [b]: '2001' } })
  const midnight = server.nextDailyReset()
  assert.equal(midnight, nextPacificMidnight(Date.now()), 'without a shift, the real Pacific midnight')
  await callGemini(server.url, a)
  await callGemini(server.url, b)
  const before = Date.now()
  const e = await rejection(() => callGemini(server.url, a))
  const v = detail(e, 'QuotaFailure').violations
  assert.deepEqual(v.map((x) => [x.quotaId, x.quotaValue]), [['GenerateRequestsPerDayPerProjectPerModel-FreeTier', '2']])
  // Google's per-day 429 says to come back in seconds, though the day only frees at midnight.
  assert.equal(detail(e, 'RetryInfo').retryDelay, '18s')
  assert.ok(e.message.includes('\nPlease retry in 18s.'), e.message)
  assert.ok(midnight - before > 18_000, 'the truth is further away (unless this ran in the 18 s before midnight)')
  assert.equal(server.usageFor({ project: '2001', model: LITE }).requestsToday, 2)
  // The day ends 300 ms from now: the project's requests count again after it.
  const reset = server.resetDayAt(Date.now() + 300)
  assert.ok(reset - Date.now() <= 300 && reset - Date.now() > 200, `resets in ${reset - Date.now()} ms`)
  await rejection(() => callGemini(server.url, b))
  await sleep(reset - Date.now() + 10)
  assert.equal(server.usageFor({ project: '2001', model: LITE }).requestsToday, 0)
  await callGemini(server.url, b)
  await callGemini(server.url, a)
  await rejection(() => callGemini(server.url, a))
  // The next reset is a Pacific midnight of the shifted calendar: 23 to 25 h later.
  const next = server.nextDailyReset() - reset
  assert.ok(next >= 23 * 3_600_000 && next <= 25 * 3_600_000, `${next} ms`)
  assert.equal(server.rateLimitedFor({ project: '2001', quota: 'rpd' }).length, 3)
  assert.equal(server.totals().byQuota.rpd, 3)

  // Delays in turn, as Google has sent them; 'honest' is the truth; a rolling day stays the default.
  const turns = await fakeServer(t, { ...GOOGLE, limits: { rpm: 100, tpm: 1e9, rpd: 1 }, dailyRetryDelay: ['0s', '18s', '34s'] })
  await callGemini(turns.url, a)
  const seen = []
  for (let i = 0; i < 4; i++) seen.push(detail(await rejection(() => callGemini(turns.url, a)), 'RetryInfo').retryDelay)
  assert.deepEqual(seen, ['0s', '18s', '34s', '0s'])
  const honest = await fakeServer(t, { ...GOOGLE, limits: { rpm: 100, tpm: 1e9, rpd: 1 }, dailyRetryDelay: 'honest' })
  await callGemini(honest.url, a)
  const h = await rejection(() => callGemini(honest.url, a))
  const untilMidnight = honest.nextDailyReset() - Date.now()
  assert.ok(Math.abs(retryDelayMs(h) - untilMidnight) < 2_000, `${retryDelayMs(h)} vs ${untilMidnight}`)
  const rolling = await fakeServer(t, { limits: { rpm: 100, tpm: 1e9, rpd: 1 }, dayMs: 400 })
  assert.equal(rolling.day, 'rolling')
  assert.equal(rolling.nextDailyReset(), undefined)
  assert.throws(() => rolling.resetDayAt(Date.now()), /day: 'pacific'/)
  await callGemini(rolling.url, a)
  await rejection(() => callGemini(rolling.url, a))
  await sleep(420)
  await callGemini(rolling.url, a)
})

test("spend: another app's use of a project's day (or minute) counts against it", async (t) => {
  const [a, b] = keysOf(2)
  const server = await fakeServer(t, { ...GOOGLE, limits: { rpm: 5, tpm: 1e9, rpd: 10 }, projects: { [a]: '3001', [b]: '3002' } })
  const u = server.spend({ project: '3001', model: FLASH, requests: 10 })
  assert.deepEqual([u.requestsToday, u.requests, u.spent.requests], [10, 0, 10])
  const e = await rejection(() => callGemini(server.url, a, { model: FLASH }))
  assert.deepEqual(server.rateLimited(a)[0].quotas, ['rpd'])
  assert.equal(detail(e, 'QuotaFailure').violations[0].quotaId, 'GenerateRequestsPerDayPerProjectPerModel-FreeTier')
  // Another model of the same project, and another project, are untouched.
  await callGemini(server.url, a, { model: LITE })
  await callGemini(server.url, b, { model: FLASH })
  // Spent in the minute: the rolling minute is full, the day has room.
  server.spend({ apiKey: b, model: LITE, requests: 5, scope: 'minute' })
  const m = await rejection(() => callGemini(server.url, b, { model: LITE }))
  assert.deepEqual(detail(m, 'QuotaFailure').violations.map((x) => x.quotaId), ['GenerateRequestsPerMinutePerProjectPerModel-FreeTier'])
  assert.equal(server.usageFor({ project: '3002', model: LITE }).requestsToday, 5)
  assert.equal(server.acceptedFor({ project: '3002' }).length, 1, 'spent requests are not accepted ones')
})

test('a quota of 0: every call gets a 429 whose violations say quotaValue "0"', async (t) => {
  const [a] = keysOf(1)
  const server = await fakeServer(t, { ...GOOGLE, models: { 'gemini-2.5-pro': { rpm: 0, tpm: 0, rpd: 0 } } })
  for (let i = 0; i < 3; i++) {
    const e = await rejection(() => callGemini(server.url, a, { model: 'gemini-2.5-pro' }))
    const v = detail(e, 'QuotaFailure').violations
    assert.deepEqual(v.map((x) => [x.quotaId, x.quotaValue]), [
      ['GenerateRequestsPerMinutePerProjectPerModel-FreeTier', '0'],
      ['GenerateContentInputTokensPerModelPerMinute-FreeTier', '0'],
      ['GenerateRequestsPerDayPerProjectPerModel-FreeTier', '0'],
    ])
    // Google still hints at a retry within the minute.
    const delay = retryDelayMs(e)
    assert.ok(delay >= 1_000 && delay <= 60_000, `${delay}`)
    assert.match(e.message, /limit: 0, model: gemini-2\.5-pro/)
  }
  await callGemini(server.url, a, { model: FLASH })
  const totals = server.totals()
  assert.equal(totals.zeroQuota, 3)
  assert.equal(totals.rateLimited, 3)
  assert.ok(server.rateLimitedFor({ model: 'gemini-2.5-pro' }).every((x) => x.zero))
  // Only rpd at 0 (a model the tier has no daily quota for).
  const dayZero = await fakeServer(t, { ...GOOGLE, models: { [FLASH]: { rpd: 0 } } })
  const d = await rejection(() => callGemini(dayZero.url, a, { model: FLASH }))
  assert.deepEqual(detail(d, 'QuotaFailure').violations.map((x) => x.quotaValue), ['0'])
  assert.notEqual(detail(d, 'RetryInfo').retryDelay, undefined)
})

test("Google's 429 body: QuotaFailure, Help, RetryInfo, the message's fractional 'Please retry in', ErrorInfo when asked", async (t) => {
  const [a] = keysOf(1)
  const server = await fakeServer(t, { ...GOOGLE, limits: { rpm: 1, tpm: 1e9, rpd: 1e6 }, windowMs: 20_000, projects: { [a]: '4001' }, errorInfo: true })
  await callGemini(server.url, a, { model: FLASH })
  const raw = await fetch(`${server.url}/v1beta/models/${FLASH}:generateContent`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-goog-api-key': a },
    body: JSON.stringify({ contents: [{ parts: [{ text: 'x' }] }] }),
  })
  assert.equal(raw.status, 429)
  const { error } = await raw.json()
  assert.deepEqual(Object.keys(error), ['code', 'message', 'status', 'details'])
  assert.equal(error.code, 429)
  assert.equal(error.status, 'RESOURCE_EXHAUSTED')
  assert.ok(error.message.startsWith(`${QUOTA_MESSAGE} To monitor your current usage`))
  const retryIn = /\nPlease retry in (\d+(?:\.\d+)?)s\.$/.exec(error.message)
  assert.ok(retryIn, error.message)
  assert.ok(Number(retryIn[1]) > 19 && Number(retryIn[1]) <= 20)
  assert.match(error.message, /\n\* Quota exceeded for metric: generativelanguage\.googleapis\.com\/generate_content_free_tier_requests, limit: 1, model: gemini-2\.0-flash\n/)
  assert.deepEqual(
    error.details.map((d) => d['@type']),
    ['QuotaFailure', 'Help', 'RetryInfo', 'ErrorInfo'].map((x) => `type.googleapis.com/google.rpc.${x}`),
  )
  assert.deepEqual(error.details[0].violations[0].quotaDimensions, { location: 'global', model: FLASH })
  assert.equal(typeof error.details[0].violations[0].quotaValue, 'string')
  assert.equal(error.details[1].links[0].url, 'https://ai.google.dev/gemini-api/docs/rate-limits')
  // RetryInfo in whole seconds (rounded up), the message with the fraction.
  assert.equal(error.details[2].retryDelay, `${Math.ceil(Number(retryIn[1]))}s`)
  assert.equal(error.details[3].metadata.consumer, 'projects/4001')
  assert.equal(error.details[3].reason, 'RATE_LIMIT_EXCEEDED')
  // The SDK's error: its message carries the details' JSON, as @google/generative-ai's does.
  const e = await rejection(() => callGemini(server.url, a, { model: FLASH }))
  assert.match(e.message, /\[429 Too Many Requests\] You exceeded your current quota/)
  assert.ok(e.message.includes('"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"'))
  // A 403 names the project too.
  server.failNext(a, 403)
  const denied = await rejection(() => callGemini(server.url, a, { model: FLASH }))
  assert.equal(denied.status, 403)
  assert.equal(detail(denied, 'ErrorInfo').metadata.consumer, 'projects/4001')
  // Fractional RetryInfo on request.
  const fractional = await fakeServer(t, { ...GOOGLE, limits: { rpm: 1, tpm: 1e9, rpd: 1e6 }, windowMs: 20_000, retryDelayFormat: 'fractional' })
  await callGemini(fractional.url, a)
  const f = await rejection(() => callGemini(fractional.url, a))
  assert.match(detail(f, 'RetryInfo').retryDelay, /^19\.\d{1,3}s$|^20s$/)
  assert.equal(detail(f, 'ErrorInfo'), undefined, 'ErrorInfo only when asked')
})

test('overload spells: 503 UNAVAILABLE for a model (or all) while they last, counted; then service', async (t) => {
  const [a, b] = keysOf(2)
  const server = await fakeServer(t, GOOGLE)
  const spell = server.overload({ model: FLASH, forMs: 300 })
  assert.ok(spell.to - spell.from === 300)
  const raw = await fetch(`${server.url}/v1beta/models/${FLASH}:generateContent`, {
    method: 'POST',
    headers: { 'x-goog-api-key': a },
    body: JSON.stringify({ contents: [{ parts: [{ text: 'x' }] }] }),
  })
  assert.equal(raw.status, 503)
  assert.deepEqual(await raw.json(), { error: { code: 503, message: 'The model is overloaded. Please try again later.', status: 'UNAVAILABLE' } })
  const e = await rejection(() => callGemini(server.url, b, { model: FLASH }))
  assert.equal(e.status, 503)
  // Another model is served meanwhile.
  await callGemini(server.url, a, { model: LITE })
  await sleep(spell.to - Date.now() + 10)
  await callGemini(server.url, a, { model: FLASH })
  assert.equal(server.overloaded(), 2)
  assert.equal(server.overloaded({ apiKey: b }), 1)
  assert.deepEqual(server.overloadedCalls().map((x) => x.model), [FLASH, FLASH])
  assert.equal(server.totals().overloaded, 2)
  assert.equal(server.acceptedFor({ model: FLASH }).length, 1, '503s are not counted against the quota')
  // Every model, between given times.
  const now = Date.now()
  server.overload({ from: now, to: now + 200 })
  await rejection(() => callGemini(server.url, a, { model: LITE }))
  assert.equal(server.overloaded({ model: LITE }), 1)
})

test('the fake in its own process: the same accessors and controls, async', async (t) => {
  const [a, b] = keysOf(2)
  const fake = await startFakeGeminiProcess({ ...GOOGLE, limits: { rpm: 2, tpm: 1e9, rpd: 3 }, projects: { [a]: '5001', [b]: '5001' } })
  t.after(() => fake.close())
  assert.equal(await fake.projectOf(a), '5001')
  await fake.spend({ project: '5001', model: FLASH, requests: 1 })
  await callGemini(fake.url, a, { model: FLASH })
  await callGemini(fake.url, b, { model: FLASH })
  await rejection(() => callGemini(fake.url, a, { model: FLASH }))
  assert.equal((await fake.acceptedFor({ project: '5001', model: FLASH })).length, 2)
  assert.deepEqual((await fake.rateLimitedFor({ project: '5001' })).map((x) => x.quotas), [['rpm', 'rpd']])
  assert.equal((await fake.usageFor({ project: '5001', model: FLASH })).requestsToday, 3)
  await fake.overload({ forMs: 200 })
  await rejection(() => callGemini(fake.url, a, { model: LITE }))
  assert.equal(await fake.overloaded(), 1)
  await fake.failNext(b, 500)
  await rejection(() => callGemini(fake.url, b, { model: LITE }))
  assert.equal((await fake.failed(b)).length, 1)
  const totals = await fake.totals()
  assert.deepEqual([totals.accepted, totals.rateLimited, totals.overloaded, totals.failed], [2, 1, 1, 1])
  assert.equal(await fake.acceptedBetween(0, Date.now() + 1, a), 1)
  assert.ok((await fake.resetDayAt(Date.now() + 100)) > Date.now())
  await assert.rejects(() => fake.spend({ project: '5001' }), /a model is needed/)
})
