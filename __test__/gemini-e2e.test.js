'use strict'

// Issue 4 point 7, end to end: three keys against a fake Gemini server that enforces per-key RPM,
// TPM and RPD over rolling windows and answers 429 with Google's error body; 20 concurrent callers
// asking for three times the keys' capacity (each waiting at most MAX_WAIT_MS for a key), for two
// simulated minutes. Simulated by shortening the
// windows: one "minute" is WINDOW_MS of real time for the server and the manager alike.
//
// - No 429 reaches a caller (execute never rejects with one).
// - The keys serve at least 99% of their capacity: requests the server accepted in
//   [start, start + DURATION_MS), against keys x RPM x DURATION_MS / WINDOW_MS. Over any interval
//   of two whole windows the server cannot accept more than that, so this is the real ceiling.
// - No key ends deactivated.

const test = require('node:test')
const assert = require('node:assert/strict')
const { PKG, fakeKey } = require('./helpers')
const { startFakeGemini, callGemini, pacedCallers } = require('./fixtures/fake-gemini')

const { ApiKeyManagerService } = require(PKG)

const KEYS = 3
const WINDOW_MS = 6_000
const DURATION_MS = 2 * WINDOW_MS
const WORKERS = 20
const RPM = 30
const TOKENS = [200, 800]
const MAX_TOKENS = TOKENS[1]
// Binds only if every request were the largest: enforced by the server all the same.
const LIMITS = { rpm: RPM, tpm: RPM * MAX_TOKENS * 1.5, rpd: 10_000 }
const MAX_WAIT_MS = 3_000
// Gemini answers in about 1 to 4 s: compressed as the minute is (60 s -> WINDOW_MS).
const LATENCY_MS = [100, 400]
// Demand: three times the capacity (keys x RPM per window), spread evenly over the workers, each
// starting its next request on schedule or, when behind, as soon as its last one is done.
const DEMAND_PER_MS = (3 * KEYS * RPM) / WINDOW_MS
const INTERVAL_MS = WORKERS / DEMAND_PER_MS

test('end to end: 3 keys, 3x their capacity from 20 callers for 2 simulated minutes: no 429 reaches a caller, >= 99% of capacity served, no key lost', async (t) => {
  const server = await startFakeGemini({ limits: LIMITS, windowMs: WINDOW_MS, tokens: TOKENS, latencyMs: LATENCY_MS, seed: 7 })
  t.after(() => server.close())
  const keys = Array.from({ length: KEYS }, (_, i) => fakeKey(i + 1))
  const m = new ApiKeyManagerService({ keys, limits: LIMITS, windowMs: WINDOW_MS, quiet: true })
  t.after(() => m.close())

  const outcome = { issued: 0, served: 0, throttled: 0, rejected429: 0, otherErrors: [] }
  const start = Date.now()
  const end = start + DURATION_MS

  await pacedCallers({
    workers: WORKERS,
    intervalMs: INTERVAL_MS,
    start,
    end,
    async once() {
      outcome.issued++
      try {
        await m.execute((key) => callGemini(server.url, key), {
          estimatedTokens: MAX_TOKENS,
          // Never wait past the end of the run.
          maxWaitMs: Math.max(0, Math.min(MAX_WAIT_MS, end - Date.now())),
        })
        outcome.served++
      } catch (e) {
        if (e && (e.status === 429 || /\b429\b|RESOURCE_EXHAUSTED/.test(e.message))) {
          outcome.rejected429++
        } else if (e && e.message === 'No active API keys available') {
          // Throttled by the manager: every key is busy for longer than this caller would wait.
          outcome.throttled++
        } else {
          outcome.otherErrors.push(String(e && e.stack))
        }
      }
    },
  })
  const finished = Date.now()

  const capacity = (KEYS * RPM * DURATION_MS) / WINDOW_MS
  const servedInRun = server.acceptedBetween(start, end)
  const totals = server.totals()
  const statuses = (await m.getAllKeysStatus()).data
  const report = {
    capacity,
    servedInRun,
    capacityUsedPct: +((100 * servedInRun) / capacity).toFixed(2),
    issued: outcome.issued,
    servedByCallers: outcome.served,
    throttledByManager: outcome.throttled,
    rejected429: outcome.rejected429,
    server429s: totals.rateLimited,
    server429sByQuota: totals.byQuota,
    acceptedTotal: totals.accepted,
    perKeyInRun: keys.map((k) => server.acceptedBetween(start, end, k)),
    maxInOneWindow: keys.map((k) => server.maxInWindow(k)),
    states: statuses.map((s) => s.state),
    otherErrors: outcome.otherErrors.length,
    runMs: finished - start,
  }
  t.diagnostic(`e2e ${JSON.stringify(report)}`)
  console.log('gemini e2e:', JSON.stringify(report))

  assert.equal(outcome.rejected429, 0, 'a 429 reached a caller')
  assert.deepEqual(outcome.otherErrors, [])
  assert.ok(servedInRun >= 0.99 * capacity, `served ${servedInRun} of ${capacity}`)
  for (const s of statuses) {
    assert.equal(s.isActive, true, `${s.apiKey} ended deactivated`)
    assert.notEqual(s.state, 'deactivated')
  }
  // Demand really was above capacity: callers had to be held back.
  assert.ok(outcome.issued >= 2 * capacity, `only ${outcome.issued} requests issued`)
  assert.ok(outcome.throttled > 0)
})
