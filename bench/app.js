'use strict'

// `npm run bench:app`: issue 12's scenario. The old app's own Gemini integration (SPEC section 6,
// __test__/fixtures/old-llm.js) over the real @langchain/google-genai client, unchanged, and
// @google/genai kept the same way; 20 callers asking for 3x what 3 keys at RPM 30 allow, for 65 s,
// against the fake Gemini (its own process) that counts per key over rolling minutes. Runs:
//
//   baseline      the plain-JS old service (bench/baseline.js) under the old integration,
//   unrouted      this package with routing switched off (the drop-in without it),
//   langchain     this package, routing on (the default), under the old integration,
//   genai         this package, @google/genai models.generateContent, one client per caller,
//   genai-stream  the same with models.generateContentStream.
//
// "capacity" is what the fake could have accepted from the calls the app made (each as soon as any
// key had room in its rolling minute, before the end); "served" is what it accepted.
//
// Options (or BENCH_<NAME>): --window=<ms> (60000; a shorter one compresses time, latency too),
// --runs=<list> (all five), --latency=<min>,<max> (1000,4000 at a 60 s window, scaled).

const { ApiKeyManagerService } = require('../lib')
const { BaselineKeyManager } = require('./baseline')
const { pointGoogleAt, runApp, startFakeGeminiProcess } = require('../__test__/fixtures/app-scenario')

function option(name, env, fallback) {
  const arg = process.argv.find((a) => a.startsWith(`--${name}=`))
  if (arg !== undefined) return arg.slice(name.length + 3)
  return process.env[env] ?? fallback
}

const WINDOW_MS = Number(option('window', 'BENCH_WINDOW', 60_000))
const DURATION_MS = Math.round((WINDOW_MS * 65) / 60)
const SCALE = WINDOW_MS / 60_000
const LATENCY = String(option('latency', 'BENCH_LATENCY', `${1000 * SCALE},${4000 * SCALE}`)).split(',').map(Number)
const RUNS = String(option('runs', 'BENCH_RUNS', 'baseline,unrouted,langchain,genai,genai-stream')).split(',')
const KEYS = [1, 2, 3].map((i) => `AIzaSyBENCHapp${String(i).padStart(3, '0')}abcdefghijklmnopqrstu`)
const RPM = 30
// Only the minute binds: the day and the tokens are far away.
const LIMITS = { rpm: RPM, tpm: 1e9, rpd: 1e6 }
const CLIENT = { baseline: 'langchain', unrouted: 'langchain', langchain: 'langchain', genai: 'genai', 'genai-stream': 'genai-stream' }

if (!(Number.isFinite(WINDOW_MS) && WINDOW_MS >= 1_000)) throw new Error(`--window must be at least 1000 ms (got ${WINDOW_MS})`)
for (const r of RUNS) if (!(r in CLIENT)) throw new Error(`unknown run ${r}: use ${Object.keys(CLIENT).join(',')}`)

const network = pointGoogleAt(null)

function managerFor(run) {
  if (run === 'baseline') return new BaselineKeyManager(KEYS, LIMITS, { windowMs: WINDOW_MS })
  return new ApiKeyManagerService({
    keys: KEYS,
    limits: LIMITS,
    // The model the old integration calls: the limits given are its.
    model: 'gemini-2.0-flash',
    windowMs: WINDOW_MS,
    reservationTtlMs: WINDOW_MS,
    routeMaxWaitMs: WINDOW_MS,
    routeRequests: run !== 'unrouted',
    quiet: true,
  })
}

/** One run in a process of its own: the old service's last calls go on retrying after a run. */
function inChild(run) {
  const { execFileSync } = require('node:child_process')
  const out = execFileSync(process.execPath, [__filename, `--one=${run}`, `--window=${WINDOW_MS}`, `--latency=${LATENCY.join(',')}`], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  return JSON.parse(out.split('\n').find((l) => l.startsWith('RESULT ')).slice('RESULT '.length))
}

async function one(run) {
  const fake = await startFakeGeminiProcess({ limits: LIMITS, windowMs: WINDOW_MS, latencyMs: LATENCY, seed: 12 })
  network.set(fake.url)
  process.env.GEMINI_BASE_URL = fake.url
  const manager = managerFor(run)
  if (manager.initialize) await manager.initialize()
  const result = await runApp({ manager, client: CLIENT[run], fake, keys: KEYS, rpm: RPM, windowMs: WINDOW_MS, durationMs: DURATION_MS })
  if (manager.close) await manager.close()
  await fake.close()
  return { run, ...result, rest: undefined }
}

const ONE = option('one', 'BENCH_ONE', '')

async function main() {
  if (ONE !== '') {
    console.log(`RESULT ${JSON.stringify(await one(ONE))}`)
    return
  }
  console.log(
    `app bench: ${KEYS.length} keys x ${RPM} RPM, window ${WINDOW_MS} ms, run ${DURATION_MS} ms, 20 callers at 3x capacity, ` +
      `latency ${LATENCY.join('-')} ms (node ${process.version})`,
  )
  const header = ['run         ', 'served', 'capacity', 'served/capacity', '429s sent to Gemini', 'calls thrown to the app', 'keys lost']
  const rows = []
  for (const run of RUNS) {
    const r = inChild(run)
    rows.push(r)
    console.log(`  ${run}: ${r.calls} calls${r.thrownErrors.length > 0 ? `; most thrown: ${r.thrownErrors[0][0]}` : ''}`)
  }
  console.log(header.join(' | '))
  for (const r of rows) {
    const cells = [
      r.run.padEnd(header[0].length),
      String(r.served).padStart(header[1].length),
      String(r.capacity).padStart(header[2].length),
      `${((100 * r.served) / r.capacity).toFixed(1)}%`.padStart(header[3].length),
      String(r.sent429).padStart(header[4].length),
      String(r.thrown).padStart(header[5].length),
      `${r.keysLost} of ${KEYS.length}`.padStart(header[6].length),
    ]
    console.log(cells.join(' | '))
  }
}

main()
  .then(() => process.exit(0))
  .catch((e) => {
    console.error(e)
    process.exit(1)
  })
