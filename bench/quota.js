'use strict'

// `npm run bench:quota`: issue 13's four scenarios against the fake Gemini (its own process),
// which counts as Google documents: per project and per model, RPM over a rolling minute, TPM on
// input tokens, RPD per Pacific day, per-day 429s with Google's short retryDelay ("18s"). Each
// scenario runs twice:
//
//   baseline  the plain-JS old service (bench/baseline.js): one list of keys, one set of limits
//             (the default model's), no projects, no models;
//   pool      this package, told each key's project and each model's limits.
//
// Both are called the same way, as the old callers call (SPEC section 6): getBestAvailableKey,
// the call, recordUsage with the error's text on a failure and handleRateLimit on a 429 (its type
// read from the text as the old integration reads it), another key on a 429 or a 503, at most 3
// attempts; a caller that gets no key gives that call up. The baseline ignores the model arguments.
// `--runs=execute` adds this package's execute(call, { model, maxWaitMs }).
//
// 20 callers, each starting a call every 3 s (or as soon as its last one ended, when later): 400
// calls a minute, far above every scenario's capacity but (d)'s. Calls take 1 to 4 s. 65 s.
//
// Options (or BENCH_<NAME>): --window=<ms> (60000: real time; shorter compresses the minute, the
// run, the calls, the overload and Google's per-day retryDelay alike, but not the pool's own
// back-off and circuit timings: read (d) at real time), --scenarios=a,b,c,d, --runs=baseline,pool,
// --latency=<min>,<max> (1000,4000 at a 60 s window, scaled), --phase=<fraction of a window> (0.5).

const { ApiKeyManagerService } = require('../lib')
const { BaselineKeyManager } = require('./baseline')
const { callGemini, pacedCallers } = require('../__test__/fixtures/fake-gemini')
const { startFakeGeminiProcess } = require('../__test__/fixtures/fake-gemini-process')

function option(name, env, fallback) {
  const arg = process.argv.find((a) => a.startsWith(`--${name}=`))
  if (arg !== undefined) return arg.slice(name.length + 3)
  return process.env[env] ?? fallback
}

const WINDOW_MS = Number(option('window', 'BENCH_WINDOW', 60_000))
const SCALE = WINDOW_MS / 60_000
const DURATION_MS = Math.round(65_000 * SCALE)
const INTERVAL_MS = 3_000 * SCALE
const WORKERS = 20
const LATENCY = String(option('latency', 'BENCH_LATENCY', `${1000 * SCALE},${4000 * SCALE}`)).split(',').map(Number)
const RUNS = String(option('runs', 'BENCH_RUNS', 'baseline,pool')).split(',')
const ONLY = String(option('scenarios', 'BENCH_SCENARIOS', 'a,b,c,d')).split(',')
const MAX_ATTEMPTS = 3
// The traffic starts this fraction of a window after the manager is built. The old service's fixed
// windows start with the process, at any moment relative to the traffic: 0.5 is the mean phase (at
// 0 its first reset races the fake's rolling window to the millisecond), as in bench/gemini.js.
const PHASE = Number(option('phase', 'BENCH_PHASE', 0.5))
const ESTIMATED_TOKENS = 800
const FLASH = 'gemini-2.0-flash'
const LITE = 'gemini-2.0-flash-lite'
// Quotas that never bind here: the minute or the day is what each scenario is about.
const FREE = { tpm: 1e9, rpd: 1e6 }

if (!(Number.isFinite(WINDOW_MS) && WINDOW_MS >= 1_000)) throw new Error(`--window must be at least 1000 ms (got ${WINDOW_MS})`)

/**
 * The scenarios. `projects` x `keysPerProject` keys; `limits`: the default model's (all the
 * baseline knows); `models`: each model's limits; `callers`: how many call which model; `spent`:
 * requests another app already used today (project index from 0); `overload`: a 503 spell of a
 * model, `atMs` into the run for `forMs` (both scaled).
 */
const SCENARIOS = {
  a: {
    title: '6 keys in 3 projects (2 each), RPM 10 per project',
    projects: 3,
    keysPerProject: 2,
    limits: { rpm: 10, ...FREE },
    callers: { [FLASH]: WORKERS },
  },
  b: {
    title: `3 projects (1 key each), ${FLASH} at RPM 15 and ${LITE} at RPM 30 on the same keys, 10 callers each`,
    projects: 3,
    keysPerProject: 1,
    limits: { rpm: 15, ...FREE },
    models: { [LITE]: { rpm: 30, ...FREE } },
    callers: { [FLASH]: WORKERS / 2, [LITE]: WORKERS / 2 },
  },
  c: {
    title: "RPD 20 per project, 3 projects (1 key each), the third project's day already spent by another app",
    projects: 3,
    keysPerProject: 1,
    limits: { rpm: 15, tpm: 1e9, rpd: 20 },
    callers: { [FLASH]: WORKERS },
    spent: [{ project: 2, model: FLASH, requests: 20 }],
  },
  d: {
    title: `a 5 s overload (503) of ${FLASH} from 20 s into the run, RPM 1,000 (never binds), 3 projects (1 key each)`,
    projects: 3,
    keysPerProject: 1,
    limits: { rpm: 1_000, ...FREE },
    callers: { [FLASH]: WORKERS },
    overload: { model: FLASH, atMs: 20_000, forMs: 5_000 },
  },
}

for (const s of ONLY) if (!(s in SCENARIOS)) throw new Error(`unknown scenario ${s}: use ${Object.keys(SCENARIOS).join(',')}`)
const RUN_KINDS = ['baseline', 'pool', 'execute']
for (const r of RUNS) if (!RUN_KINDS.includes(r)) throw new Error(`unknown run ${r}: use ${RUN_KINDS.join(',')}`)

const projectName = (i) => String(1001 + i)

function keysOf(s) {
  const keys = []
  for (let p = 0; p < s.projects; p++) {
    for (let k = 0; k < s.keysPerProject; k++) {
      keys.push({ apiKey: `AIzaSyBENCHquota${projectName(p)}k${k}abcdefghijklmnopq`, project: projectName(p) })
    }
  }
  return keys
}

const limitsOf = (s, model) => ({ ...s.limits, ...(s.models ?? {})[model] })
const modelsOf = (s) => Object.keys(s.callers)

function managerFor(run, s, keys) {
  if (run === 'baseline') return new BaselineKeyManager(keys.map((k) => k.apiKey), s.limits, { windowMs: WINDOW_MS })
  return new ApiKeyManagerService({
    keys,
    limits: s.limits,
    // Every model named, the default one included: the built-in free-tier table is not this run's.
    modelLimits: Object.fromEntries(modelsOf(s).map((m) => [m, limitsOf(s, m)])),
    model: FLASH,
    windowMs: WINDOW_MS,
    quiet: true,
  })
}

/** The window a 429's text names, as the old integration reads it (SPEC section 6). */
function limitType(text) {
  if (text.includes('daily') || text.includes('day')) return 'RPD'
  if (text.includes('token') || text.includes('TPM')) return 'TPM'
  return 'RPM'
}

/** One call the way the old callers make it. */
async function oldStyleCall(m, url, model, tally) {
  for (let attempt = 1; attempt <= MAX_ATTEMPTS; attempt++) {
    const r = await m.getBestAvailableKey({ model, estimatedTokens: ESTIMATED_TOKENS })
    if (!r.success) {
      tally.noKey++
      return
    }
    const [key] = r.data
    const started = Date.now()
    try {
      const result = await callGemini(url, key, { model })
      await m.recordUsage(key, result.response.usageMetadata.totalTokenCount, true, undefined, Date.now() - started, { model })
      return
    } catch (e) {
      const text = String(e.message)
      await m.recordUsage(key, 0, false, text, Date.now() - started, { model })
      if (e.status === 429) await m.handleRateLimit(key, limitType(text), { model })
      else if (e.status !== 503) {
        tally.otherErrors++
        return
      }
    }
  }
  tally.gaveUp++
}

/** One call through execute(), which waits for room (never past the end) and retries itself. */
async function executeCall(m, url, model, tally, end) {
  try {
    await m.execute((key) => callGemini(url, key, { model }), { model, estimatedTokens: ESTIMATED_TOKENS, maxWaitMs: Math.max(0, end - Date.now()) })
  } catch (e) {
    if (e && (e.status === 429 || e.status === 503)) tally.gaveUp++
    else if (e && /No active API keys available/.test(e.message)) tally.noKey++
    else tally.otherErrors++
  }
}

/**
 * The calls the callers are asked to make: each caller one every INTERVAL_MS from its place in the
 * stagger (as pacedCallers starts them) until the end, whatever became of the others.
 */
function offeredCalls(s, start, end) {
  const calls = []
  for (const [model, workers] of Object.entries(s.callers)) {
    for (let i = 0; i < workers; i++) {
      for (let at = start + (i * INTERVAL_MS) / workers; at < end; at += INTERVAL_MS) calls.push({ at, model })
    }
  }
  return calls.sort((x, y) => x.at - y.at)
}

/**
 * The capacity: the most the fake could have accepted, before `end`, of the calls offered. Each, in
 * order, is served at the earliest moment from when it is due at which some project has room for
 * its model (fewer than its RPM in the rolling window, requests left of its day after what was
 * spent) and the model is not overloaded; TPM never binds here. The same for every run of a
 * scenario: a manager that keeps its callers waiting makes fewer calls, not less capacity.
 * Returns the moments served, by model, and the overload spell.
 */
function idealService(s, { start, end }) {
  const buckets = {}
  for (const model of modelsOf(s)) {
    const { rpm, rpd } = limitsOf(s, model)
    buckets[model] = Array.from({ length: s.projects }, (_, p) => ({ rpm, left: rpd - spentOf(s, p, model), times: [] }))
  }
  const spell = spellOf(s, start)
  const served = Object.fromEntries(modelsOf(s).map((m) => [m, []]))
  for (const { at, model } of offeredCalls(s, start, end)) {
    let best
    let bestAt = Infinity
    for (const b of buckets[model]) {
      if (b.left <= 0) continue
      const n = b.times.length
      // In time order per project: room once the rpm-th latest has left the window.
      let t = Math.max(at, n > 0 ? b.times[n - 1] : at, n >= b.rpm ? b.times[n - b.rpm] + WINDOW_MS : at)
      if (spell && spell.model === model && t >= spell.from && t < spell.to) t = spell.to
      if (t < bestAt) {
        bestAt = t
        best = b
      }
    }
    if (best === undefined || bestAt >= end) continue
    best.times.push(bestAt)
    best.left--
    served[model].push(bestAt)
  }
  return { served, spell }
}

/** The scenario's overload, in real instants of a run that starts at `start`. */
const spellOf = (s, start) => s.overload && { model: s.overload.model, from: start + s.overload.atMs * SCALE, to: start + (s.overload.atMs + s.overload.forMs) * SCALE }

const spentOf = (s, project, model) => (s.spent ?? []).filter((x) => x.project === project && x.model === model).reduce((n, x) => n + x.requests, 0)

/** What the limits alone allow in the run: per project and model, min(RPM x ceil(run / window), RPD left). */
function limitBound(s) {
  let n = 0
  for (const model of modelsOf(s)) {
    const { rpm, rpd } = limitsOf(s, model)
    for (let p = 0; p < s.projects; p++) n += Math.min(rpm * Math.ceil(DURATION_MS / WINDOW_MS), Math.max(0, rpd - spentOf(s, p, model)))
  }
  return n
}

async function run(name, s) {
  const keys = keysOf(s)
  const fake = await startFakeGeminiProcess({
    limits: s.limits,
    models: s.models,
    projects: Object.fromEntries(keys.map((k) => [k.apiKey, k.project])),
    windowMs: WINDOW_MS,
    tpmCounts: 'input',
    day: 'pacific',
    // Google's hint for a spent day, compressed with the minute.
    dailyRetryDelay: `${Number((18 * SCALE).toFixed(3))}s`,
    latencyMs: LATENCY,
    seed: 13,
  })
  for (const x of s.spent ?? []) await fake.spend({ project: projectName(x.project), model: x.model, requests: x.requests })
  const m = managerFor(name, s, keys)
  if (m.initialize) await m.initialize()
  await new Promise((resolve) => setTimeout(resolve, PHASE * WINDOW_MS))
  const tally = { calls: 0, noKey: 0, gaveUp: 0, otherErrors: 0 }
  const start = Date.now()
  const end = start + DURATION_MS
  if (s.overload) await fake.overload(spellOf(s, start))
  await Promise.all(
    Object.entries(s.callers).map(([model, workers]) =>
      pacedCallers({
        workers,
        intervalMs: INTERVAL_MS,
        start,
        end,
        async once() {
          tally.calls++
          if (name === 'execute') await executeCall(m, fake.url, model, tally, end)
          else await oldStyleCall(m, fake.url, model, tally)
        },
      }),
    ),
  )
  const { served: ideal, spell } = idealService(s, { start, end })
  const totals = await fake.totals()
  const perModel = {}
  for (const model of modelsOf(s)) {
    perModel[model] = { served: (await fake.acceptedFor({ model, from: start, to: end })).length, capacity: ideal[model].length }
  }
  const result = {
    run: name,
    calls: tally.calls,
    served: await fake.acceptedBetween(start, end),
    capacity: Object.values(ideal).reduce((n, x) => n + x.length, 0),
    sent429: totals.rateLimited,
    byQuota: totals.byQuota,
    overloaded: totals.overloaded,
    keysLost: ((await m.getAllKeysStatus()).data ?? []).filter((k) => !k.isActive).length,
    keys: keys.length,
    noKey: tally.noKey,
    gaveUp: tally.gaveUp,
    otherErrors: tally.otherErrors,
    perModel,
  }
  if (s.spent) {
    // The spent project: its per-day 429s, and from its first to its last.
    const project = projectName(s.spent[0].project)
    const day = await fake.rateLimitedFor({ project, quota: 'rpd' })
    result.spentProject = { project, rpd429: day.length, firstToLastMs: day.length > 0 ? day[day.length - 1].at - day[0].at : 0 }
    result.remainingOfDay = limitBound(s)
  }
  if (spell) {
    result.afterOverload = {
      served: await fake.acceptedBetween(spell.to, end),
      capacity: Object.values(ideal).reduce((n, x) => n + x.filter((t) => t >= spell.to).length, 0),
    }
  }
  if (m.close) await m.close()
  await fake.close()
  return result
}

const pct = (a, b) => (b > 0 ? `${((100 * a) / b).toFixed(1)}%` : '-')

function print(id, s, rows) {
  const header = ['run     ', 'served', 'capacity', 'served/capacity', '429s sent to Gemini (rpm/tpm/rpd)', 'calls into overloads', 'keys lost']
  console.log(`\n(${id}) ${s.title}`)
  console.log(`    limits alone allow ${limitBound(s)} in the run: per project and model, min(RPM x ceil(${DURATION_MS} / ${WINDOW_MS}), RPD left today)`)
  console.log(header.join(' | '))
  for (const r of rows) {
    const cells = [
      r.run.padEnd(header[0].length),
      String(r.served).padStart(header[1].length),
      String(r.capacity).padStart(header[2].length),
      pct(r.served, r.capacity).padStart(header[3].length),
      `${r.sent429} (${r.byQuota.rpm}/${r.byQuota.tpm}/${r.byQuota.rpd})`.padStart(header[4].length),
      String(r.overloaded).padStart(header[5].length),
      `${r.keysLost} of ${r.keys}`.padStart(header[6].length),
    ]
    console.log(cells.join(' | '))
    const notes = [`${r.calls} calls, ${r.noKey} found no key, ${r.gaveUp} given up after ${MAX_ATTEMPTS} attempts`]
    if (Object.keys(r.perModel).length > 1) {
      for (const [model, x] of Object.entries(r.perModel)) notes.push(`${model} ${x.served} of ${x.capacity} (${pct(x.served, x.capacity)})`)
    }
    if (r.spentProject) {
      notes.push(
        `remaining calls of the day ${r.remainingOfDay}; per-day 429s on project ${r.spentProject.project}: ${r.spentProject.rpd429}, ` +
          `first to last ${(r.spentProject.firstToLastMs / 1000).toFixed(1)} s`,
      )
    }
    if (r.afterOverload) notes.push(`after the overload served ${r.afterOverload.served} of ${r.afterOverload.capacity} (${pct(r.afterOverload.served, r.afterOverload.capacity)})`)
    if (r.otherErrors > 0) notes.push(`${r.otherErrors} other errors`)
    console.log(`    ${notes.join('; ')}`)
  }
}

async function main() {
  console.log(
    `quota bench: window ${WINDOW_MS} ms (one minute), run ${DURATION_MS} ms, ${WORKERS} callers each starting a call every ${INTERVAL_MS} ms, ` +
      `latency ${LATENCY.join('-')} ms, traffic from ${PHASE} window after the manager starts, fake Gemini per project and model ` +
      `(node ${process.version})`,
  )
  console.log(
    'capacity: the most the fake could have accepted of the calls offered (each caller one every interval, staggered, to the ' +
      'end): each, in order, served at the earliest moment from when it is due at which a project has room for its model ' +
      '(under its RPM in the rolling window, requests left of its day after what another app spent) and the model is not ' +
      'overloaded, before the end. served: requests the fake accepted during the run. 429s: all the fake sent, by the quotas ' +
      'they name. calls: the calls the callers made (a caller waits for its last one).',
  )
  const all = {}
  for (const id of ONLY) {
    const s = SCENARIOS[id]
    const rows = []
    for (const name of RUNS) rows.push(await run(name, s))
    print(id, s, rows)
    all[id] = rows
  }
  console.log(`RESULT ${JSON.stringify(all)}`)
}

main()
  .then(() => process.exit(0))
  .catch((e) => {
    console.error(e)
    process.exit(1)
  })
