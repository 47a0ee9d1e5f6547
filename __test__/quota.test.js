'use strict'

// Issue 13: the pool counts quota as Gemini does, tested through the JS API against the fake
// Gemini (fixtures/fake-gemini.js) that counts per project and model as Google documents: keys of
// one project share a budget, each model has its own, and every kind of 429 is read for what it
// means. Calls are made as the old callers make them (getBestAvailableKey, the call, recordUsage
// with the SDK's error) or through execute(); routing is off so that each test sees those paths.
// Short windows (WINDOW_MS) on both sides keep the tests quick.

const test = require('node:test')
const assert = require('node:assert/strict')
const { PKG, fakeKey, mask } = require('./helpers')
const { startFakeGemini, callGemini, nextPacificMidnight } = require('./fixtures/fake-gemini')

const { ApiKeyManagerService } = require(PKG)

const WINDOW_MS = 3000
const FLASH = 'gemini-2.0-flash'
const LITE = 'gemini-2.0-flash-lite'
const GOOGLE = { tpmCounts: 'input', day: 'pacific', windowMs: WINDOW_MS }
const keysOf = (n, from) => Array.from({ length: n }, (_, i) => fakeKey(from + i))
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function fake(t, options) {
  const server = await startFakeGemini({ ...GOOGLE, ...options })
  t.after(() => server.close())
  return server
}

function manager(t, options) {
  const m = new ApiKeyManagerService({ quiet: true, routeRequests: false, windowMs: WINDOW_MS, ...options })
  t.after(() => m.close())
  return m
}

/** One call as the old callers make it; resolves to 'served', 'busy' (no key) or the error. */
async function callOnce(m, server, model, tokens = 10) {
  const r = await m.getBestAvailableKey({ model, estimatedTokens: tokens })
  if (!r.success) return { outcome: 'busy', nextAvailableAt: r.metadata.nextAvailableAt }
  const key = r.data[0]
  const started = Date.now()
  try {
    await callGemini(server.url, key, { model, tokens, inputTokens: tokens })
    await m.recordUsage(key, tokens, true, undefined, Date.now() - started, { model })
    return { outcome: 'served', key }
  } catch (e) {
    await m.recordUsage(key, 0, false, e, Date.now() - started, { model })
    return { outcome: 'failed', key, error: e }
  }
}

/** `callers` loops of callOnce for `ms`, each pausing until a key frees when none is. */
async function drive(m, server, { callers, ms, model }) {
  const end = Date.now() + ms
  const outcomes = { served: 0, busy: 0, failed: 0 }
  await Promise.all(
    Array.from({ length: callers }, async (_, i) => {
      const m_ = typeof model === 'function' ? model(i) : model
      while (Date.now() < end) {
        const r = await callOnce(m, server, m_)
        outcomes[r.outcome]++
        if (r.outcome === 'busy') {
          const wait = r.nextAvailableAt ? new Date(r.nextAvailableAt).getTime() - Date.now() : 50
          await sleep(Math.min(Math.max(wait, 5), end - Date.now()))
        }
      }
    }),
  )
  return outcomes
}

async function statusOf(m, key) {
  const all = await m.getAllKeysStatus()
  return all.data.find((s) => s.apiKey === key)
}

test('keys of one project share its budget: no 429 where counting per key would send them', async (t) => {
  const keys = keysOf(6, 300)
  const projects = Object.fromEntries(keys.map((k, i) => [k, String(1001 + Math.floor(i / 2))]))
  const limits = { rpm: 4, rpd: 10_000, tpm: 1_000_000 }
  const server = await fake(t, { limits, projects })
  const m = manager(t, { keys: keys.map((apiKey) => ({ apiKey, project: projects[apiKey] })), limits, model: LITE })
  const outcomes = await drive(m, server, { callers: 8, ms: 4000, model: LITE })
  assert.equal(server.totals().rateLimited, 0, 'no 429 sent to Gemini')
  assert.equal(outcomes.failed, 0)
  for (const project of ['1001', '1002', '1003']) {
    const accepted = server.acceptedFor({ project, model: LITE })
    assert.ok(accepted.length >= limits.rpm, `project ${project} served ${accepted.length}`)
    assert.ok(server.maxInWindowFor({ project, model: LITE }) <= limits.rpm)
    // Load spread over the project's keys too.
    assert.equal(new Set(accepted.map((a) => a.apiKey)).size, 2)
  }
  const s = await statusOf(m, keys[0])
  assert.equal(s.project, '1001')
  // Both keys of project 1001 show the same budget.
  assert.deepEqual((await statusOf(m, keys[1])).models[LITE].rpm.current, s.models[LITE].rpm.current)

  // The same keys told as projects of their own: the pool believes it has twice the quota, and
  // Gemini refuses the difference. This is what the rule above prevents.
  const naive = await fake(t, { limits, projects })
  const m2 = manager(t, { keys, limits, model: LITE })
  await drive(m2, naive, { callers: 8, ms: 2000, model: LITE })
  assert.ok(naive.totals().rateLimited > 0, 'counting per key sends 429s')
})

test("each model is its own budget on the same keys, with the table's limits or modelLimits", async (t) => {
  const keys = keysOf(2, 320)
  const limits = { rpm: 3, rpd: 10_000, tpm: 1_000_000 }
  const server = await fake(t, { limits, models: { [FLASH]: { rpm: 5 } } })
  const m = manager(t, { keys, limits, model: LITE, modelLimits: { [FLASH]: { rpm: 5, rpd: 10_000, tpm: 1_000_000 } } })
  const outcomes = await drive(m, server, { callers: 8, ms: 4000, model: (i) => (i % 2 ? FLASH : LITE) })
  assert.equal(server.totals().rateLimited, 0)
  assert.equal(outcomes.failed, 0)
  const lite = server.acceptedFor({ model: LITE }).length
  const flash = server.acceptedFor({ model: FLASH }).length
  // Each model used beyond one window's worth of the other's.
  assert.ok(lite >= 2 * limits.rpm, `lite ${lite}`)
  assert.ok(flash >= 2 * 5, `flash ${flash}`)
  assert.ok(flash > lite, 'the model with the larger limit served more')
  for (const key of keys) {
    assert.ok(server.maxInWindowFor({ apiKey: key, model: FLASH }) <= 5)
    assert.ok(server.maxInWindowFor({ apiKey: key, model: LITE }) <= 3)
  }
  const s = await statusOf(m, keys[0])
  assert.deepEqual(Object.keys(s.models).sort(), [FLASH, LITE])
  assert.equal(s.models[FLASH].rpm.limit, 5)
  // `limits` stays the default model's.
  assert.equal(s.limits.rpm.limit, 3)
  const info = await m.getRateLimitInfo(keys[0], { model: FLASH })
  assert.equal(info.data.find((i) => i.type === 'RPM').limit, 5)
  const stats = await m.getUsageStats()
  const row = stats.data.find((r) => r.apiKey === mask(keys[0]))
  assert.equal(row.models[FLASH].rpm.limit, 5)
  assert.ok(row.models[FLASH].rpm.resetTime instanceof Date)
  const metrics = m.getMetrics()
  assert.ok(metrics.budgets.some((b) => b.model === FLASH && b.rpm.limit === 5))
})

test("a spent day rests that project's budget until midnight Pacific, whatever retryDelay says", async (t) => {
  const [spent, fresh] = keysOf(2, 340)
  const limits = { rpm: 1000, rpd: 5, tpm: 1_000_000 }
  const projects = { [spent]: '2001', [fresh]: '2002' }
  // Google's short, misleading delays on a per-day 429.
  const server = await fake(t, { limits, projects, dailyRetryDelay: ['0s', '18s'] })
  server.spend({ project: '2001', model: LITE, requests: 5 })
  const m = manager(t, { keys: [spent, fresh].map((apiKey) => ({ apiKey, project: projects[apiKey] })), limits, model: LITE })
  const results = []
  for (let i = 0; i < 8; i++) results.push(await callOnce(m, server, LITE))
  // One per-day 429 on the spent project (the call that found out); the fresh one's 5 served;
  // then nothing is free.
  const daily = server.rateLimitedFor({ project: '2001', quota: 'rpd' })
  assert.equal(daily.length, 1)
  assert.equal(server.acceptedFor({ project: '2002' }).length, 5)
  assert.equal(results.filter((r) => r.outcome === 'served').length, 5)
  const last = results.at(-1)
  assert.equal(last.outcome, 'busy')
  const midnight = nextPacificMidnight(Date.now())
  assert.equal(new Date(last.nextAvailableAt).getTime(), midnight)
  const s = await statusOf(m, spent)
  assert.equal(s.models[LITE].state, 'resting')
  assert.equal(s.models[LITE].stateUntil.getTime(), midnight)
  assert.equal(s.models[LITE].rpd.current, 5, 'the day counted full')
  // Past the "0s" Google gave, nothing more goes to the spent project.
  await sleep(1200)
  for (let i = 0; i < 3; i++) assert.equal((await callOnce(m, server, LITE)).outcome, 'busy')
  assert.equal(server.rateLimitedFor({ project: '2001' }).length, 1)
})

test('a per-minute 429 rests until the later of its delay and the window freeing, never 0 s', async (t) => {
  const [key] = keysOf(1, 360)
  const limits = { rpm: 10, rpd: 10_000, tpm: 1_000_000 }
  const server = await fake(t, { limits })
  // Another app filled this minute: the pool has counted nothing of it.
  server.spend({ apiKey: key, model: LITE, requests: 10, scope: 'minute' })
  const m = manager(t, { keys: [key], limits, model: LITE })
  const first = await callOnce(m, server, LITE)
  assert.equal(first.outcome, 'failed')
  assert.equal(first.error.status, 429)
  const s = await statusOf(m, key)
  assert.equal(s.models[LITE].state, 'resting')
  const restMs = s.models[LITE].stateUntil.getTime() - Date.now()
  assert.ok(restMs >= 500, `rests ${restMs} ms`)
  assert.equal((await callOnce(m, server, LITE)).outcome, 'busy')
  assert.equal(server.rateLimited(key).length, 1)
  // Served again once the window frees.
  await sleep(WINDOW_MS + 200)
  assert.equal((await callOnce(m, server, LITE)).outcome, 'served')
})

test('quotaValue "0": that (project, model) is unusable until reactivated; its other models serve', async (t) => {
  const [key] = keysOf(1, 380)
  const limits = { rpm: 100, rpd: 10_000, tpm: 1_000_000 }
  const server = await fake(t, { limits, models: { [FLASH]: { rpm: 0 } } })
  const m = manager(t, { keys: [key], limits, model: LITE })
  const first = await callOnce(m, server, FLASH)
  assert.equal(first.outcome, 'failed')
  for (let i = 0; i < 3; i++) assert.equal((await callOnce(m, server, FLASH)).outcome, 'busy')
  assert.equal(server.totals().zeroQuota, 1, 'one 429 for a quota of 0, then none')
  const s = await statusOf(m, key)
  assert.equal(s.models[FLASH].state, 'no-quota')
  assert.equal(s.state, 'active', 'the key is fine')
  assert.equal((await callOnce(m, server, LITE)).outcome, 'served')
  assert.equal((await m.reactivateKey(key)).success, true)
  assert.equal((await statusOf(m, key)).models[FLASH].state, 'active')
})

test('a 429 without details: a short rest that grows, not a day', async (t) => {
  const [key] = keysOf(1, 390)
  const limits = { rpm: 100, rpd: 10_000, tpm: 1_000_000 }
  const server = await fake(t, { limits })
  const bare = { error: { code: 429, message: 'Resource has been exhausted (e.g. check quota).', status: 'RESOURCE_EXHAUSTED' } }
  server.failNext(key, 429, 2, bare)
  const m = manager(t, { keys: [key], limits, model: LITE })
  assert.equal((await callOnce(m, server, LITE)).outcome, 'failed')
  const firstRest = (await statusOf(m, key)).models[LITE].stateUntil.getTime() - Date.now()
  assert.ok(firstRest > 0 && firstRest <= 2000, `first rest ${firstRest} ms`)
  await sleep(firstRest + 50)
  assert.equal((await callOnce(m, server, LITE)).outcome, 'failed')
  const secondRest = (await statusOf(m, key)).models[LITE].stateUntil.getTime() - Date.now()
  assert.ok(secondRest > firstRest && secondRest <= 5000, `second rest ${secondRest} ms after ${firstRest}`)
  await sleep(secondRest + 50)
  assert.equal((await callOnce(m, server, LITE)).outcome, 'served')
})

test('503 overload backs the model off (few calls into it, no key circuit opened), then full service', async (t) => {
  const keys = keysOf(3, 400)
  const limits = { rpm: 1000, rpd: 100_000, tpm: 10_000_000 }
  const server = await fake(t, { limits })
  const spell = server.overload({ model: LITE, forMs: 2000 })
  const m = manager(t, { keys, limits, model: LITE })
  await drive(m, server, { callers: 10, ms: 2000, model: LITE })
  const into = server.overloaded({ model: LITE })
  assert.ok(into >= 1 && into <= 15, `${into} calls into the overload`)
  for (const key of keys) {
    const s = await statusOf(m, key)
    assert.notEqual(s.state, 'circuit-open')
    assert.equal(s.isActive, true)
  }
  // After the spell: served again once the back-off lets a probe through.
  await sleep(Math.max(0, spell.to - Date.now()))
  const after = await drive(m, server, { callers: 4, ms: 2500, model: LITE })
  assert.ok(after.served > 20, `served ${after.served} after`)
  // The other models never backed off.
  assert.equal((await callOnce(m, server, FLASH)).outcome, 'served')
})

test("Gemini's ErrorInfo names a key's project: learnt, and the project's keys share a budget from then on", async (t) => {
  const [a, b] = keysOf(2, 420)
  const limits = { rpm: 2, rpd: 10_000, tpm: 1_000_000 }
  const server = await fake(t, { limits, projects: { [a]: '3001', [b]: '3001' }, errorInfo: true })
  const m = manager(t, { keys: [a, b], limits, model: LITE })
  // Told nothing, the pool counts a and b apart, so a 429 comes: its ErrorInfo names project 3001.
  const outcomes = []
  for (let i = 0; i < 4; i++) outcomes.push((await callOnce(m, server, LITE)).outcome)
  assert.ok(outcomes.includes('failed'), outcomes.join())
  const projectsNow = [(await statusOf(m, a)).project, (await statusOf(m, b)).project]
  assert.ok(projectsNow.includes('3001'), `learnt: ${projectsNow}`)
  // Once both are known to be in 3001, the window is counted once for both.
  await sleep(WINDOW_MS + 200)
  const before = server.totals().rateLimited
  await drive(m, server, { callers: 4, ms: 2 * WINDOW_MS, model: LITE })
  assert.ok(server.totals().rateLimited - before <= 1, 'at most the 429 that teaches the second key')
  assert.deepEqual([(await statusOf(m, a)).project, (await statusOf(m, b)).project], ['3001', '3001'])
})
