'use strict'

// `npm run bench:gemini`: issue 4's end-to-end run as a benchmark. Three keys against a fake Gemini
// server that enforces per-key RPM, TPM and RPD over rolling windows and answers 429 with Google's
// error body; 20 concurrent callers asking for three times the keys' capacity, for two simulated
// minutes (one "minute" = --window ms of real time, for the server and both managers alike). Run:
//
//   1. this manager, called through execute() (the helper of issue 4),
//   2. this manager, called as callers used the old service (getBestAvailableKey, the call,
//      recordUsage(key, tokens, success, error), on a 429 handleRateLimit(key, 'RPM') and another
//      key, 3 attempts at most),
//   3. the plain-JS baseline of the old algorithm (bench/baseline.js, its windows shortened to the
//      same simulated minute by its windowMs option), called the same old way.
//
// Simulated time compresses the latency too: Gemini's 1 to 4 s become 100 to 400 ms.
//
// Options (or BENCH_<NAME> in the environment): --duration=<ms> (default 2 windows),
// --window=<ms> (default 6000), --workers=<n> (20), --latency=<min>,<max> (100,400),
// --demand=<multiple of capacity> (3; 0: callers loop without pause, pausing window/100 when no key
// was free), --phase=<fraction of a window> (0.5, see PHASE), --runs=execute,old-caller,baseline.

const { ApiKeyManagerService } = require('../lib')
const { BaselineKeyManager } = require('./baseline')
const { startFakeGemini, callGemini, pacedCallers } = require('../__test__/fixtures/fake-gemini')

function option(name, env, fallback) {
  const arg = process.argv.find((a) => a.startsWith(`--${name}=`))
  if (arg !== undefined) return arg.slice(name.length + 3)
  return process.env[env] ?? fallback
}

const WINDOW_MS = Number(option('window', 'BENCH_WINDOW', 6_000))
const DURATION_MS = Number(option('duration', 'BENCH_DURATION', 2 * WINDOW_MS))
const WORKERS = Number(option('workers', 'BENCH_WORKERS', 20))
const RUNS = String(option('runs', 'BENCH_RUNS', 'execute,old-caller,baseline')).split(',')
const KEYS = 3
const RPM = 30
const TOKENS = [200, 800]
const MAX_TOKENS = TOKENS[1]
const LIMITS = { rpm: RPM, tpm: RPM * MAX_TOKENS * 1.5, rpd: 10_000 }
const MAX_WAIT_MS = Math.min(3_000, WINDOW_MS / 2)
const LATENCY = String(option('latency', 'BENCH_LATENCY', '100,400')).split(',').map(Number)
// Requests asked for, as a multiple of the keys' capacity; 0: every caller loops without pause.
const DEMAND = Number(option('demand', 'BENCH_DEMAND', 3))
const DEMAND_PER_MS = (DEMAND * KEYS * RPM) / WINDOW_MS
const INTERVAL_MS = DEMAND > 0 ? WORKERS / DEMAND_PER_MS : 0
const IDLE_MS = WINDOW_MS / 100
// The traffic starts this fraction of a window after the manager is built. The old service's fixed
// windows start with the process, at any moment relative to the traffic: 0.5 is the mean phase.
// (At 0 the baseline's first reset races the server's rolling window to the millisecond.)
const PHASE = Number(option('phase', 'BENCH_PHASE', 0.5))

for (const [name, value] of Object.entries({ WINDOW_MS, DURATION_MS, WORKERS })) {
  if (!(Number.isFinite(value) && value > 0)) throw new Error(`${name} must be a positive number (got ${value})`)
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)))
const is429 = (e) => e != null && (e.status === 429 || /\b429\b|RESOURCE_EXHAUSTED/.test(String(e.message)))

function keysOf(n) {
  return Array.from({ length: n }, (_, i) => `AIzaSyBENCHgemini${String(i + 1).padStart(3, '0')}abcdefghijklmnopqrs`)
}

/** One request through execute(); resolves to what happened to it. */
async function viaExecute(m, url, tally, end) {
  try {
    await m.execute((key) => callGemini(url, key), {
      estimatedTokens: MAX_TOKENS,
      maxWaitMs: Math.max(0, Math.min(MAX_WAIT_MS, end - Date.now())),
    })
    tally.served++
  } catch (e) {
    if (is429(e)) {
      tally.seen429++
      tally.failed429++
    } else if (e && e.message === 'No active API keys available') tally.throttled++
    else tally.otherErrors++
  }
}

/** One request the way callers used the old service. */
async function viaOldCaller(m, url, tally) {
  for (let attempt = 1; attempt <= 3; attempt++) {
    const r = await m.getBestAvailableKey()
    if (!r.success) {
      tally.throttled++
      return
    }
    const [key] = r.data
    const started = Date.now()
    try {
      const result = await callGemini(url, key)
      await m.recordUsage(key, result.response.usageMetadata.totalTokenCount, true, undefined, Date.now() - started)
      tally.served++
      return
    } catch (e) {
      await m.recordUsage(key, 0, false, e.message, Date.now() - started)
      if (!is429(e)) {
        tally.otherErrors++
        return
      }
      tally.seen429++
      await m.handleRateLimit(key, 'RPM')
    }
  }
  tally.failed429++
}

async function run(name) {
  const server = await startFakeGemini({ limits: LIMITS, windowMs: WINDOW_MS, tokens: TOKENS, latencyMs: LATENCY.length === 1 ? LATENCY[0] : LATENCY, seed: 7 })
  const keys = keysOf(KEYS)
  const m =
    name === 'baseline'
      ? new BaselineKeyManager(keys, LIMITS, { windowMs: WINDOW_MS })
      : new ApiKeyManagerService({ keys, limits: LIMITS, windowMs: WINDOW_MS, quiet: true })
  const request = name === 'execute' ? viaExecute : viaOldCaller
  const tally = { issued: 0, served: 0, throttled: 0, seen429: 0, failed429: 0, otherErrors: 0 }
  await sleep(PHASE * WINDOW_MS)
  const start = Date.now()
  const end = start + DURATION_MS
  await pacedCallers({
    workers: WORKERS,
    intervalMs: INTERVAL_MS,
    start,
    end,
    async once() {
      tally.issued++
      const throttled = tally.throttled
      await request(m, server.url, tally, end)
      // Callers without a schedule pause a little when no key was free, rather than spin.
      return INTERVAL_MS === 0 && tally.throttled > throttled ? Date.now() + IDLE_MS : undefined
    },
  })
  const statuses = (await m.getAllKeysStatus()).data
  const totals = server.totals()
  const capacity = (KEYS * RPM * DURATION_MS) / WINDOW_MS
  const servedInRun = server.acceptedBetween(start, end)
  await server.close()
  if (m.close) await m.close()
  return {
    name,
    issued: tally.issued,
    served: servedInRun,
    capacity,
    usedPct: (100 * servedInRun) / capacity,
    seen429: tally.seen429,
    failed429: tally.failed429,
    server429: totals.rateLimited,
    throttled: tally.throttled,
    otherErrors: tally.otherErrors,
    deactivated: statuses.filter((s) => !s.isActive).length,
  }
}

const LABELS = {
  execute: 'manager, execute()',
  'old-caller': 'manager, old-style caller',
  baseline: 'plain-JS baseline (old algorithm)',
}

;(async () => {
  console.log(
    `gemini bench: ${KEYS} keys x ${RPM} RPM, window ${WINDOW_MS} ms (one simulated minute), run ${DURATION_MS} ms ` +
      `(${(DURATION_MS / WINDOW_MS).toFixed(2)} simulated minutes), ${WORKERS} callers ` +
      `${DEMAND > 0 ? `asking for ${DEMAND}x capacity` : 'looping without pause'}, ` +
      `latency ${LATENCY.join('-')} ms, traffic from ${PHASE} window after the manager starts, ` +
      `execute maxWaitMs ${MAX_WAIT_MS} (node ${process.version})`,
  )
  const rows = []
  for (const name of RUNS) {
    if (!LABELS[name]) throw new Error(`unknown run ${name}: use ${Object.keys(LABELS).join(',')}`)
    rows.push(await run(name))
  }
  const header = [
    'run                               ',
    'requests served',
    'capacity',
    'capacity used',
    '429s seen by callers',
    'requests failed by 429',
    '429s sent by server',
    'held back (no key)',
    'keys deactivated',
  ]
  console.log(header.join(' | '))
  for (const r of rows) {
    const cells = [
      LABELS[r.name].padEnd(header[0].length),
      String(r.served).padStart(header[1].length),
      String(r.capacity).padStart(header[2].length),
      `${r.usedPct.toFixed(1)}%`.padStart(header[3].length),
      String(r.seen429).padStart(header[4].length),
      String(r.failed429).padStart(header[5].length),
      String(r.server429).padStart(header[6].length),
      String(r.throttled).padStart(header[7].length),
      `${r.deactivated} of ${KEYS}`.padStart(header[8].length),
    ]
    console.log(cells.join(' | '))
  }
  console.log(
    'served: requests the server accepted during the run; capacity: keys x RPM x run / window; 429s seen by callers: ' +
      '429s the calling code had to handle (for execute(), its rejections: it retries 429s itself); requests failed by 429: ' +
      'requests given up with a 429; held back: requests refused by the manager for want of a free key.',
  )
  console.log(`RESULT ${JSON.stringify(rows)}`)
})().catch((e) => {
  console.error(e)
  process.exit(1)
})
