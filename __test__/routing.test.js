'use strict'

// Issue 12: the app's own Gemini calls obey the pool. The Google SDKs' requests (over the global
// fetch) that carry a pool key are routed through the manager's loopback server, whose router
// picks the key, waits for room, retries 429s and 503s, and counts each call once; nothing else is
// touched. The "network" of these tests takes Google's host to a local server (`direct`), so a
// request that was not routed is seen there; routed ones go to GEMINI_BASE_URL (`gemini`).

const test = require('node:test')
const assert = require('node:assert/strict')
const http = require('node:http')
const { PKG, fakeKey, statusOf, runFixture, expectClean } = require('./helpers')
const { startFakeGemini } = require('./fixtures/fake-gemini')
const { pointGoogleAt, runApp, startFakeGeminiProcess } = require('./fixtures/app-scenario')
const { BaselineKeyManager } = require('../bench/baseline')

// Before the package: the routing wraps whatever fetch it finds, as it would an app's.
const network = pointGoogleAt(null)
const { ApiKeyManagerService } = require(PKG)
const { ChatGoogleGenerativeAI } = require('@langchain/google-genai')
const { GoogleGenAI } = require('@google/genai')

const GOOGLE = 'https://generativelanguage.googleapis.com'
const MODEL = 'gemini-2.0-flash'
const keysOf = (n, from = 1) => Array.from({ length: n }, (_, i) => fakeKey(from + i))
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/**
 * A routing manager over `keys`, `gemini` (the fake the router sends to, GEMINI_BASE_URL) and
 * `direct` (the fake Google's host leads to, for requests that are not routed); all closed after.
 */
async function setup(t, { keys = keysOf(2), limits = { rpm: 30, rpd: 200, tpm: 1_000_000 }, fake = {}, ...options } = {}) {
  const gemini = await startFakeGemini({ limits, ...fake })
  const direct = await startFakeGemini({ limits })
  process.env.GEMINI_BASE_URL = gemini.url
  network.set(direct.url)
  // The SDKs call MODEL: its limits are the ones given.
  const m = new ApiKeyManagerService({ keys, limits, model: MODEL, quiet: true, ...options })
  await m.initialize()
  t.after(async () => {
    await m.close()
    delete process.env.GEMINI_BASE_URL
    await Promise.all([gemini.close(), direct.close()])
  })
  return { m, keys, gemini, direct }
}

const langchain = (apiKey, fields = {}) => new ChatGoogleGenerativeAI({ apiKey, model: MODEL, maxRetries: 0, ...fields })
const accepted = (fake, key) => fake.accepted(key).length

test('the SDKs requests with a pool key go through the pool to GEMINI_BASE_URL; other keys and hosts are untouched', async (t) => {
  const { keys, gemini, direct } = await setup(t)
  const answer = await langchain(keys[0]).invoke('Hello')
  assert.match(String(answer.content), /^Fake answer/)
  const ai = new GoogleGenAI({ apiKey: keys[1] })
  const generated = await ai.models.generateContent({ model: MODEL, contents: 'Hello' })
  assert.match(generated.text, /^Fake answer/)
  assert.equal(gemini.totals().accepted, 2, 'both went through the router')
  assert.equal(direct.totals().requests, 0)

  // A key the pool does not own goes out as the app sent it.
  const stranger = fakeKey(900)
  await langchain(stranger).invoke('Hello')
  assert.equal(accepted(direct, stranger), 1)
  assert.equal(accepted(gemini, stranger), 0)

  // Another host, even with a pool key in the Gemini header, is not touched.
  const seen = []
  const other = http.createServer((req, res) => {
    seen.push({ url: req.url, key: req.headers['x-goog-api-key'], token: req.headers['x-gkm-route-token'] })
    res.end('ok')
  })
  await new Promise((resolve) => other.listen(0, '127.0.0.1', resolve))
  t.after(() => new Promise((resolve) => other.close(resolve)))
  const r = await fetch(`http://127.0.0.1:${other.address().port}/v1beta/models/${MODEL}:generateContent?key=${keys[0]}`, {
    method: 'POST',
    headers: { 'x-goog-api-key': keys[0] },
    body: '{}',
  })
  assert.equal(await r.text(), 'ok')
  assert.deepEqual(seen, [{ url: `/v1beta/models/${MODEL}:generateContent?key=${keys[0]}`, key: keys[0], token: undefined }])
})

test('a key in ?key= travels in the header; the route token and the caller headers do not leak upstream', async (t) => {
  const keys = keysOf(1)
  const seen = []
  const upstream = http.createServer((req, res) => {
    seen.push({ url: req.url, headers: req.headers })
    req.resume()
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ candidates: [], usageMetadata: { totalTokenCount: 7 } }))
    })
  })
  await new Promise((resolve) => upstream.listen(0, '127.0.0.1', resolve))
  process.env.GEMINI_BASE_URL = `http://127.0.0.1:${upstream.address().port}`
  network.set(null)
  const m = new ApiKeyManagerService({ keys, model: MODEL, quiet: true })
  await m.initialize()
  t.after(async () => {
    await m.close()
    delete process.env.GEMINI_BASE_URL
    await new Promise((resolve) => upstream.close(resolve))
  })
  const r = await fetch(`${GOOGLE}/v1beta/models/${MODEL}:generateContent?alt=json&key=${keys[0]}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-goog-api-client': 'genai-js/1.0', authorization: 'Bearer app-token' },
    body: JSON.stringify({ contents: [{ parts: [{ text: 'Hi' }] }] }),
  })
  assert.equal(r.status, 200)
  assert.equal(seen.length, 1)
  assert.equal(seen[0].url, `/v1beta/models/${MODEL}:generateContent?alt=json`)
  assert.equal(seen[0].headers['x-goog-api-key'], keys[0])
  assert.equal(seen[0].headers['x-goog-api-client'], 'genai-js/1.0')
  for (const name of ['x-gkm-route-token', 'authorization', 'accept-encoding']) assert.equal(seen[0].headers[name], undefined, name)
  assert.equal((await statusOf(m, keys[0])).limits.tpm.current, 7)
})

test('routeRequests: false and KEY_MANAGER_ROUTE_REQUESTS=false switch routing off; a bad value is a clear error', async (t) => {
  const { keys, gemini, direct } = await setup(t, { routeRequests: false })
  await langchain(keys[0]).invoke('Hello')
  assert.equal(accepted(direct, keys[0]), 1)
  assert.equal(gemini.totals().requests, 0)

  process.env.KEY_MANAGER_ROUTE_REQUESTS = 'false'
  t.after(() => delete process.env.KEY_MANAGER_ROUTE_REQUESTS)
  const off = new ApiKeyManagerService({ keys: keysOf(1, 50), quiet: true })
  assert.equal((await off.initialize()).success, true)
  await langchain(fakeKey(50)).invoke('Hello')
  assert.equal(accepted(direct, fakeKey(50)), 1)
  await off.close()

  process.env.KEY_MANAGER_ROUTE_REQUESTS = 'sometimes'
  const bad = new ApiKeyManagerService({ keys: keysOf(1, 60), quiet: true })
  const r = await bad.initialize()
  assert.equal(r.success, false)
  assert.match(r.error, /KEY_MANAGER_ROUTE_REQUESTS must be 1, true, yes, 0, false or no \(got "sometimes"\)/)
  // The option wins over the environment.
  const explicit = new ApiKeyManagerService({ keys: keysOf(1, 61), quiet: true, routeRequests: true })
  assert.equal((await explicit.initialize()).success, true)
  await explicit.close()
})

test('routing says once in the log that it is on, and how to switch it off', () => {
  const run = runFixture('routing-log.js')
  const result = expectClean(run, assert)
  assert.equal(result.announcements, 1)
  assert.match(result.line, /^🔀 .*routed through the key pool.*routeRequests: false.*KEY_MANAGER_ROUTE_REQUESTS=false/)
})

test('a request after a hand-out uses that reservation; the router counts it once, with the real tokens', async (t) => {
  const { m, gemini } = await setup(t, { keys: keysOf(3) })
  const best = await m.getBestAvailableKey()
  const [key] = best.data
  assert.equal((await statusOf(m, key)).limits.rpm.current, 1, 'reserved at hand-out')
  await langchain(key).invoke('Hello')
  assert.equal(accepted(gemini, key), 1, 'sent with the key handed out')
  const tokens = gemini.accepted(key)[0].tokens
  // The app's own report of the same call (with its estimate) is not a second one.
  assert.deepEqual(await m.recordUsage(key, 3, true, undefined, 120), { success: true, metadata: {} })
  const s = await statusOf(m, key)
  assert.equal(s.limits.rpm.current, 1)
  assert.equal(s.limits.rpd.current, 1)
  assert.equal(s.limits.tpm.current, tokens)
  const usage = m.getMetrics()
  assert.equal(usage.calls.successes, 1)
})

test('a client kept across calls gets the best key at each call; counts never land on the stale key', async (t) => {
  const limits = { rpm: 2, rpd: 200, tpm: 1_000_000 }
  const { m, keys, gemini } = await setup(t, { keys: keysOf(3), limits })
  const stale = langchain(keys[0])
  for (let i = 0; i < 6; i++) {
    await stale.invoke(`Question ${i}`)
    // The old integration reports every call on the key its client was built with.
    await m.recordUsage(keys[0], 10, true, undefined, 50)
  }
  assert.deepEqual(keys.map((k) => accepted(gemini, k)), [2, 2, 2], 'spread over the keys, none past its limit')
  assert.equal(gemini.totals().rateLimited, 0)
  for (const k of keys) {
    const s = await statusOf(m, k)
    assert.equal(s.limits.rpm.current, 2, 'each key counted for what it sent, once')
    assert.equal(s.limits.tpm.current, gemini.accepted(k).reduce((n, a) => n + a.tokens, 0))
  }
})

test('no room: a routed request waits for it; past routeMaxWaitMs it gets a Google-shaped 429 without reaching Gemini', async (t) => {
  const limits = { rpm: 1, rpd: 200, tpm: 1_000_000 }
  const { m, keys, gemini } = await setup(t, { keys: keysOf(1), limits, windowMs: 1_500, fake: { windowMs: 1_500 } })
  const llm = langchain(keys[0])
  await llm.invoke('First')
  const started = Date.now()
  const waiting = llm.invoke('Second')
  // getBestAvailableKey keeps its immediate answer meanwhile.
  const meanwhile = await m.getBestAvailableKey()
  assert.equal(meanwhile.success, false)
  await waiting
  const waited = Date.now() - started
  assert.ok(waited >= 1_000, `the second call waited for the window (${waited} ms)`)
  assert.equal(gemini.totals().rateLimited, 0)
  assert.equal(accepted(gemini, keys[0]), 2)

  // A wait longer than allowed: answered at once, as Gemini would, with when to come back.
  const impatient = new ApiKeyManagerService({ keys: keysOf(1, 70), limits, model: MODEL, windowMs: 60_000, routeMaxWaitMs: 200, quiet: true })
  await impatient.initialize()
  t.after(() => impatient.close())
  const key = fakeKey(70)
  await langchain(key).invoke('First')
  const r = await fetch(`${GOOGLE}/v1beta/models/${MODEL}:generateContent`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-goog-api-key': key },
    body: JSON.stringify({ contents: [{ parts: [{ text: 'Second' }] }] }),
  })
  assert.equal(r.status, 429)
  assert.ok(Number(r.headers.get('retry-after')) > 50)
  const body = await r.json()
  assert.equal(body.error.code, 429)
  assert.equal(body.error.status, 'RESOURCE_EXHAUSTED')
  const info = body.error.details.find((d) => d['@type'] === 'type.googleapis.com/google.rpc.RetryInfo')
  const seconds = Number(/^(\d+(?:\.\d+)?)s$/.exec(info.retryDelay)[1])
  assert.ok(seconds > 50 && seconds <= 61, info.retryDelay)
  assert.equal(accepted(gemini, key), 1, 'the refused request never reached Gemini')
  // The app reports the failure and the 429 as the old integration does: the key is not rested
  // for a 429 Gemini never sent, and the failed call is not counted again.
  await impatient.recordUsage(key, 5, false, `[429 Too Many Requests] ${body.error.message}`, 3)
  await impatient.handleRateLimit(key, 'RPM')
  const s = await statusOf(impatient, key)
  assert.equal(s.errorCount, 0)
  assert.equal(s.limits.rpm.current, 1)
  assert.equal(impatient.getMetrics().keys.find((k) => k.state !== 'active'), undefined)
})

test("Gemini's 503 is retried after a back-off and its 429 on another key, before the SDK sees them", async (t) => {
  // The pool allows more than Gemini does on the first key: another client of it used it up.
  const { m, keys, gemini } = await setup(t, { keys: keysOf(2), limits: { rpm: 30, rpd: 200, tpm: 1_000_000 } })
  gemini.failNext('*', 503, 2)
  const started = Date.now()
  const answer = await langchain(keys[0]).invoke('Hello')
  assert.match(String(answer.content), /^Fake answer/)
  assert.ok(Date.now() - started >= 300, 'backed off between the attempts')
  assert.equal(gemini.totals().failed, 2)

  for (let i = 0; i < 30; i++) {
    await fetch(`${gemini.url}/v1beta/models/${MODEL}:generateContent`, {
      method: 'POST',
      headers: { 'x-goog-api-key': keys[1] },
      body: JSON.stringify({ contents: [{ parts: [{ text: 'x' }] }] }),
    })
  }
  const before = accepted(gemini, keys[0])
  const ai = new GoogleGenAI({ apiKey: keys[1] })
  const generated = await ai.models.generateContent({ model: MODEL, contents: 'Hello' })
  assert.match(generated.text, /^Fake answer/)
  assert.equal(gemini.rateLimited(keys[1]).length, 1, "Gemini's 429 on the used-up key, read once")
  assert.equal(accepted(gemini, keys[0]), before + 1, 'and the call served on the other key')
  const rested = await statusOf(m, keys[1])
  assert.equal(rested.isActive, true, 'a 429 is not a strike against the key')
  assert.deepEqual(m.getMetrics().keys.map((k) => k.state), ['active', 'resting'], 'it rests until its window frees')
})

test('streams are routed: tokens from the last chunk; a stream cut after its first byte reaches the SDK as it is', async (t) => {
  const { m, keys, gemini } = await setup(t, { keys: keysOf(1), fake: { streamChunks: 4 } })
  const ai = new GoogleGenAI({ apiKey: keys[0] })
  let text = ''
  for await (const chunk of await ai.models.generateContentStream({ model: MODEL, contents: 'Hello' })) text += chunk.text ?? ''
  assert.match(text, /^Fake answer #1/)
  const tokens = gemini.accepted(keys[0])[0].tokens
  await sleep(50)
  assert.equal((await statusOf(m, keys[0])).limits.tpm.current, tokens)

  gemini.breakNextStream(keys[0])
  const failed = await (async () => {
    try {
      for await (const chunk of await ai.models.generateContentStream({ model: MODEL, contents: 'Again' })) void chunk
    } catch (e) {
      return e
    }
    return null
  })()
  assert.ok(failed instanceof Error, 'the cut reaches the SDK')
  assert.equal(accepted(gemini, keys[0]), 2, 'not retried once bytes were on their way')
  await sleep(50)
  assert.equal((await statusOf(m, keys[0])).limits.rpm.current, 2)
})

test('a closed manager routes nothing', async (t) => {
  const { m, keys, direct, gemini } = await setup(t)
  await m.close()
  await langchain(keys[0]).invoke('Hello')
  assert.equal(accepted(direct, keys[0]), 1)
  assert.equal(gemini.totals().requests, 0)
})

// The scenario, in time compressed tenfold (a 6 s "minute", 100-400 ms calls): 20 callers
// at 3x demand over 3 keys at RPM 30 for 65/60 of a window, against the fake in its own process.
const WINDOW_MS = 6_000
const SCENARIO = { rpm: 30, windowMs: WINDOW_MS, durationMs: Math.round((WINDOW_MS * 65) / 60), workers: 20, demand: 3 }
const SCENARIO_KEYS = [1, 2, 3].map((i) => fakeKey(200 + i))
const SCENARIO_LIMITS = { rpm: 30, tpm: 1e9, rpd: 1e6 }

async function scenario(t, which, client) {
  const fake = await startFakeGeminiProcess({ limits: SCENARIO_LIMITS, windowMs: WINDOW_MS, latencyMs: [100, 400] })
  network.set(fake.url)
  process.env.GEMINI_BASE_URL = fake.url
  const manager =
    which === 'baseline'
      ? new BaselineKeyManager(SCENARIO_KEYS, SCENARIO_LIMITS, { windowMs: WINDOW_MS })
      : new ApiKeyManagerService({
          keys: SCENARIO_KEYS,
          limits: SCENARIO_LIMITS,
          model: MODEL,
          windowMs: WINDOW_MS,
          reservationTtlMs: WINDOW_MS,
          routeMaxWaitMs: WINDOW_MS,
          quiet: true,
        })
  const run = await runApp({ manager, client, fake, keys: SCENARIO_KEYS, ...SCENARIO })
  if (manager.close) await manager.close()
  await run.rest
  delete process.env.GEMINI_BASE_URL
  await fake.close()
  t.diagnostic(`${which} ${client}: ${JSON.stringify({ ...run, rest: undefined })}`)
  return run
}

test("the old app's own integration, unchanged, over the drop-in: no 429 reaches Gemini, the capacity is served", async (t) => {
  const baseline = await scenario(t, 'baseline', 'langchain')
  assert.ok(baseline.sent429 > 100, `the old service lets the storm through (${baseline.sent429} 429s)`)
  for (const client of ['langchain', 'genai', 'genai-stream']) {
    const run = await scenario(t, 'pool', client)
    assert.equal(run.sent429, 0, `${client}: 429s sent to Gemini`)
    // All but a few: on a loaded machine a call or two at the run's edges can miss its window.
    assert.ok(run.served >= 0.97 * run.capacity, `${client}: served ${run.served} of a capacity of ${run.capacity}`)
    // Every wait fitted in routeMaxWaitMs (the window): nothing was thrown to the app.
    assert.equal(run.thrown, 0, `${client}: ${JSON.stringify(run.thrownErrors)}`)
    assert.equal(run.keysLost, 0)
  }
})
