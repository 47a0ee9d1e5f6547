'use strict'

// `npm run bench:http`: throughput and latency of GET /api/keys/best at 20 connections, measured
// with autocannon from this process against servers each started in a child process
// (bench/http-server.js), so the load generator never shares the measured server's event loop:
//
//   ours      the addon's Rust server (manager.serve)
//   bare      a bare hyper server (examples/bare_hyper.rs) answering the very reply `ours` gave
//             (status, headers, body), with the same hyper settings and tokio runtime class: the
//             floor of any server here
//   baseline  Express + the plain-JS BaselineKeyManager (the old service's code path and route)
//   adapter   Express + this package's keyRoutes(manager) (for reference)
//
// `ours` and `bare` run in ROUNDS alternating rounds (medians reported); the others once. 10 keys,
// limits of 1e12 so no key runs out. BENCH_DURATION (seconds, default 10) sets the length of each
// measured run; each is preceded by a short warm-up. All traffic goes to 127.0.0.1.

const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { spawn } = require('node:child_process')
const autocannon = require('autocannon')

const DURATION = Number(process.env.BENCH_DURATION ?? 10)
const WARMUP = Math.min(2, Math.max(1, Math.round(DURATION / 5)))
const CONNECTIONS = 20
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3)
const SERVER = path.join(__dirname, 'http-server.js')
const BARE = path.join(__dirname, '..', 'target', 'release', 'examples', 'bare_hyper')
// Headers hyper writes itself, for either server.
const HYPER_OWN = new Set(['date', 'content-length', 'connection', 'keep-alive', 'transfer-encoding'])

if (!(DURATION > 0)) throw new Error(`BENCH_DURATION must be a positive number of seconds (got ${process.env.BENCH_DURATION})`)

/** Starts `bench/http-server.js kind` (or `bare_hyper replyFile`); resolves with { port, stop } once it prints READY. */
function startServer(kind, replyFile) {
  return new Promise((resolve, reject) => {
    const [command, args] = kind === 'bare' ? [BARE, [replyFile]] : [process.execPath, [SERVER, kind]]
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'inherit'] })
    let out = ''
    const onExit = (code) => reject(new Error(`${kind} server exited (${code}) before it was ready:\n${out}`))
    child.once('exit', onExit)
    child.stdout.setEncoding('utf8').on('data', (d) => {
      out += d
      const m = out.match(/READY (\d+)/)
      if (m) {
        child.stdout.removeAllListeners('data')
        child.stdout.resume()
        child.off('exit', onExit)
        const exited = new Promise((r) => child.once('exit', r))
        resolve({
          port: Number(m[1]),
          pid: child.pid,
          stop() {
            if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM')
            return exited
          },
        })
      }
    })
  })
}

/**
 * One autocannon run. autocannon's own latency histogram keeps whole milliseconds, too coarse for
 * these servers, so the response times (fractional ms) are collected from its 'response' events.
 */
async function load(url, duration) {
  let times = new Float64Array(1 << 20)
  let n = 0
  const instance = autocannon({ url, connections: CONNECTIONS, duration, pipelining: 1 })
  instance.on('response', (client, statusCode, bytes, responseTime) => {
    if (n === times.length) {
      const bigger = new Float64Array(times.length * 2)
      bigger.set(times)
      times = bigger
    }
    times[n++] = responseTime
  })
  const result = await instance
  const sorted = times.subarray(0, n).sort()
  const at = (q) => (n === 0 ? NaN : sorted[Math.min(n - 1, Math.floor(q * n))])
  return { result, p50: at(0.5), p99: at(0.99) }
}

/** GET /api/keys/best once: its status, the headers hyper does not write itself, and its body. */
async function probe(kind, port) {
  const res = await fetch(`http://127.0.0.1:${port}/api/keys/best`)
  const body = await res.text()
  const parsed = JSON.parse(body)
  if (res.status !== 200 || !parsed.success || !/^.{8}\.\.\..{4}$/.test(parsed.data.apiKey)) {
    throw new Error(`${kind}: unexpected answer ${res.status} ${body}`)
  }
  const headers = [...res.headers].filter(([name]) => !HYPER_OWN.has(name))
  return { status: res.status, headers, body }
}

async function measure(kind, server) {
  const url = `http://127.0.0.1:${server.port}/api/keys/best`
  await load(url, WARMUP)
  const { result: r, p50, p99 } = await load(url, DURATION)
  return { kind, rps: r.requests.average, p50, p99, total: r.requests.total, errors: r.errors + r.timeouts, non2xx: r.non2xx }
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

/** The median run of a kind's rounds, by requests per second. */
function medianRun(runs) {
  const m = median(runs.map((r) => r.rps))
  return runs.reduce((a, b) => (Math.abs(b.rps - m) < Math.abs(a.rps - m) ? b : a))
}

const LABELS = {
  ours: 'ours: Rust server (manager.serve)',
  bare: 'bare hyper, the same reply (floor)',
  baseline: 'baseline: Express + plain-JS manager',
  adapter: 'ours via Express keyRoutes (reference)',
}

;(async () => {
  console.log(
    `GET /api/keys/best, ${CONNECTIONS} connections, ${DURATION} s per run after a ${WARMUP} s warm-up, ` +
      `10 keys; load generator in this process, each server in its own (node ${process.version}, ${os.cpus().length} cores)`,
  )
  const ours = await startServer('ours')
  const replyFile = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'bench-http-')), 'reply')
  let bare = null
  const rounds = { ours: [], bare: [] }
  try {
    const reply = await probe('ours', ours.port)
    fs.writeFileSync(replyFile, `${reply.status}\n${reply.headers.map(([n, v]) => `${n}: ${v}`).join('\n')}\n\n${reply.body}`)
    bare = await startServer('bare', replyFile)
    const same = await probe('bare', bare.port)
    if (JSON.stringify(same) !== JSON.stringify(reply)) throw new Error(`bare: not the same reply: ${JSON.stringify(same)}`)
    console.log(`reply: ${reply.status}, ${reply.headers.map(([n]) => n).join(', ')}, ${Buffer.byteLength(reply.body)} bytes of body`)
    for (let i = 0; i < ROUNDS; i++) {
      rounds.ours.push(await measure('ours', ours))
      rounds.bare.push(await measure('bare', bare))
    }
  } finally {
    await ours.stop()
    if (bare !== null) await bare.stop()
    fs.rmSync(path.dirname(replyFile), { recursive: true, force: true })
  }
  const results = [medianRun(rounds.ours), medianRun(rounds.bare)]
  for (const kind of ['baseline', 'adapter']) {
    const server = await startServer(kind)
    try {
      await probe(kind, server.port)
      results.push(await measure(kind, server))
    } finally {
      await server.stop()
    }
  }
  console.log(`ours, rounds (req/s): ${rounds.ours.map((r) => r.rps.toFixed(0)).join(', ')}; bare: ${rounds.bare.map((r) => r.rps.toFixed(0)).join(', ')}`)
  console.log(`${'server'.padEnd(40)} | ${'req/s (avg)'.padStart(11)} | ${'p50 ms'.padStart(6)} | ${'p99 ms'.padStart(6)} | ${'requests'.padStart(9)} | errors/non-2xx`)
  for (const r of results) {
    console.log(
      `${LABELS[r.kind].padEnd(40)} | ${r.rps.toFixed(0).padStart(11)} | ${r.p50.toFixed(3).padStart(6)} | ${r.p99.toFixed(3).padStart(6)} | ${String(r.total).padStart(9)} | ${r.errors}/${r.non2xx}`,
    )
  }
  const by = Object.fromEntries(results.map((r) => [r.kind, r]))
  console.log(`ratio rps ours/bare hyper (medians of ${ROUNDS} rounds): ${(by.ours.rps / by.bare.rps).toFixed(2)}`)
  console.log(`ratio rps ours/baseline: ${(by.ours.rps / by.baseline.rps).toFixed(2)}`)
  console.log(`ratio rps adapter/baseline: ${(by.adapter.rps / by.baseline.rps).toFixed(2)}`)
  if (results.some((r) => r.errors > 0 || r.non2xx > 0)) {
    console.error('❌ some requests failed')
    process.exitCode = 1
  }
})().catch((e) => {
  console.error(`❌ ${e && e.stack ? e.stack : e}`)
  process.exitCode = 1
})
