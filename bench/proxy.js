'use strict'

// `npm run bench:proxy`: what the Gemini proxy adds over calling the fake Gemini directly, beside a
// plain Node `http` proxy doing the same forwarding (the client's token swapped for a pool key in
// `x-goog-api-key`, hop-by-hop headers dropped, the answer piped through), in the same run:
//
//   latency   generateContent, one connection, requests one after another: p50 and p99 of each
//             path, and what each proxy adds to the direct call's
//   ttfb      streamGenerateContent?alt=sse, one connection: time to the first byte of the body
//   rps       requests per second at 50 connections (autocannon), and the CPU time each process
//             spent per request meanwhile (Linux: /proc/<pid>/stat), against two upstreams:
//             - fixed: bench/fixed-upstream, one Rust thread answering every request with
//               the bytes the fake answered this request with: it costs a few µs a request, so
//               the rate measured is the proxies' (the goal's figure)
//             - fake: the fake Gemini, a Node server on the same 2 cores, which caps every path
//               at its own rate (shown for comparison)
//
// The latency and ttfb figures are against the fake: one connection at a time leaves it idle
// between requests, so it adds the same to every path and the added figures are the proxies'.
// The fake (limits far above the load) runs in its own process, the fixed upstream in another,
// each proxy in another, the load from this one; everything on 127.0.0.1. BENCH_REQUESTS (default
// 3000) sets the sequential requests per path and round, BENCH_DURATION (seconds, default 8) each
// autocannon run. The latency rounds alternate the three paths, so a noisy moment of a shared
// machine falls on all. Run as `node bench/proxy.js ours|node <upstreamUrl>` it is one of the
// proxies.

const http = require('node:http')
const path = require('node:path')
const { spawn } = require('node:child_process')
const autocannon = require('autocannon')
const { fakeKey } = require('../__test__/helpers')
const { startFakeGeminiProcess } = require('../__test__/fixtures/fake-gemini-process')

const TOKEN = 'bench-proxy-token'
const MODEL = 'gemini-2.0-flash'
const KEYS = Array.from({ length: 10 }, (_, i) => fakeKey(i + 1))
const HUGE = { rpm: 1e9, rpd: 1e12, tpm: 1e15 }
const REQUESTS = Number(process.env.BENCH_REQUESTS ?? 3000)
const DURATION = Number(process.env.BENCH_DURATION ?? 8)
const CONNECTIONS = 50
const ROUNDS = 3
const BODY = JSON.stringify({ contents: [{ role: 'user', parts: [{ text: 'Say hello.' }] }], tokens: 100 })
const HOP_BY_HOP = ['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'host']

/** The plain Node proxy: the same forwarding as ours, key chosen round-robin. */
function nodeProxy(upstreamUrl) {
  const upstream = new URL(upstreamUrl)
  const agent = new http.Agent({ keepAlive: true, maxSockets: 256 })
  let next = 0
  const server = http.createServer((req, res) => {
    if (req.headers['x-goog-api-key'] !== TOKEN) {
      res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":{"code":401}}')
      return
    }
    const headers = {}
    for (const [name, value] of Object.entries(req.headers)) {
      if (!HOP_BY_HOP.includes(name) && name !== 'x-goog-api-key' && name !== 'authorization') headers[name] = value
    }
    headers['x-goog-api-key'] = KEYS[next++ % KEYS.length]
    const out = http.request({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers, agent }, (answer) => {
      const back = {}
      for (const [name, value] of Object.entries(answer.headers)) if (!HOP_BY_HOP.includes(name)) back[name] = value
      res.writeHead(answer.statusCode, back)
      answer.pipe(res)
    })
    out.on('error', () => res.destroy())
    req.pipe(out)
  })
  server.keepAliveTimeout = 30_000
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server.address().port)))
}

/** This package's proxy, as `npm start` serves it. */
async function ourProxy(upstreamUrl) {
  process.env.GEMINI_BASE_URL = upstreamUrl
  const { ApiKeyManagerService } = require('..')
  const m = new ApiKeyManagerService({ keys: KEYS, limits: HUGE, model: MODEL, quiet: true, routeRequests: false })
  await m.initialize()
  const server = await m.serve({ host: '127.0.0.1', port: 0, proxyTokens: [TOKEN] })
  return server.port
}

/** Starts `node bench/proxy.js kind upstreamUrl`; resolves as `ready` does. */
function startProxy(kind, upstreamUrl) {
  const child = spawn(process.execPath, [__filename, kind, upstreamUrl], { stdio: ['pipe', 'pipe', 'inherit'] })
  return ready(kind, child, () => child.stdin.end())
}

const FIXED = path.join(__dirname, '..', 'target', 'fixed-upstream', 'release', 'fixed-upstream')

/** Starts the fixed upstream answering `answer` ({ status, headers, body }) to every request. */
function startFixed(answer) {
  const child = spawn(FIXED, [], { stdio: ['pipe', 'pipe', 'inherit'] })
  child.stdin.end(JSON.stringify(answer))
  return ready('fixed upstream', child, () => child.kill())
}

/** Resolves with { pid, url, stop } once `child` prints READY <port>; `end` asks it to exit. */
function ready(kind, child, end) {
  return new Promise((resolve, reject) => {
    let out = ''
    child.once('exit', (code) => reject(new Error(`${kind} proxy exited (${code}):\n${out}`)))
    child.stdout.setEncoding('utf8').on('data', (d) => {
      out += d
      const m = out.match(/READY (\d+)/)
      if (m) {
        child.stdout.removeAllListeners('data')
        const exited = new Promise((r) => child.once('exit', r))
        resolve({
          pid: child.pid,
          url: `http://127.0.0.1:${m[1]}`,
          stop: () => {
            end()
            return exited
          },
        })
      }
    })
  })
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 1 })

/** What `base` answers one generateContent: status, the headers a server does not set per
 * connection or per answer, body. */
function recorded(base, key) {
  return new Promise((resolve, reject) => {
    const target = `${base}/v1beta/models/${MODEL}:generateContent`
    const req = http.request(target, { method: 'POST', headers: { 'content-type': 'application/json', 'x-goog-api-key': key } }, (res) => {
      let body = ''
      res.setEncoding('utf8').on('data', (d) => (body += d))
      res.on('end', () => {
        const own = [...HOP_BY_HOP, 'date', 'content-length']
        const headers = Object.entries(res.headers).filter(([name]) => !own.includes(name))
        resolve({ status: res.statusCode, headers, body })
      })
    })
    req.on('error', reject)
    req.end(BODY)
  })
}

/** One request on the kept-alive connection; resolves with [ms to the first body byte, ms in all]. */
function once(base, target, body, key) {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint()
    const req = http.request(`${base}${target}`, { method: 'POST', agent, headers: { 'content-type': 'application/json', 'x-goog-api-key': key } }, (res) => {
      let first
      res.on('data', () => {
        first ??= process.hrtime.bigint()
      })
      res.on('end', () => {
        if (res.statusCode !== 200) return reject(new Error(`${base}${target}: ${res.statusCode}`))
        const end = process.hrtime.bigint()
        resolve([Number(first - started) / 1e6, Number(end - started) / 1e6])
      })
    })
    req.on('error', reject)
    req.end(body)
  })
}

const quantile = (sorted, q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]

async function sequential(paths, target, pick) {
  const samples = Object.fromEntries(paths.map((p) => [p.name, []]))
  for (let round = 0; round < ROUNDS; round++) {
    for (const p of paths) {
      for (let i = 0; i < 200; i++) await once(p.url, target, BODY, p.key) // warm-up
      for (let i = 0; i < REQUESTS / ROUNDS; i++) samples[p.name].push(pick(await once(p.url, target, BODY, p.key)))
    }
  }
  const out = {}
  for (const [name, values] of Object.entries(samples)) {
    values.sort((a, b) => a - b)
    out[name] = { p50: quantile(values, 0.5), p99: quantile(values, 0.99) }
  }
  return out
}

/** CPU time (user + system, ms) process `pid` has used, all its threads; null off Linux. */
function cpuMs(pid) {
  if (pid === undefined || process.platform !== 'linux') return null
  const stat = require('node:fs').readFileSync(`/proc/${pid}/stat`, 'utf8')
  // Fields after the command name (which may hold spaces), from the third on: utime is the 14th.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  // In clock ticks of USER_HZ, 100 on every Linux the addon builds for.
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100
}

async function rps(url, key, pids) {
  const run = (duration) =>
    new Promise((resolve, reject) => {
      const instance = autocannon(
        {
          url: `${url}/v1beta/models/${MODEL}:generateContent`,
          method: 'POST',
          headers: { 'content-type': 'application/json', 'x-goog-api-key': key },
          body: BODY,
          connections: CONNECTIONS,
          duration,
        },
        (err, result) => (err ? reject(err) : resolve(result)),
      )
      autocannon.track(instance, { renderProgressBar: false, renderResultsTable: false, renderLatencyTable: false })
    })
  await run(1)
  const before = Object.entries(pids).map(([name, pid]) => [name, cpuMs(pid)])
  const result = await run(DURATION)
  // CPU µs per request of each process named (null off Linux).
  const cpu = Object.fromEntries(
    before.map(([name, ms]) => [name, ms === null ? null : ((cpuMs(pids[name]) - ms) * 1000) / result.requests.total]),
  )
  return { rps: result.requests.average, non2xx: result.non2xx, errors: result.errors, cpu }
}

/** The figures of `rps` for each path, on one line each. */
async function rates(upstream, paths) {
  console.log(`requests per second at ${CONNECTIONS} connections, ${DURATION} s each, upstream ${upstream.name}:`)
  const out = {}
  for (const p of paths) {
    const pids = { upstream: upstream.pid, ...(p.pid === undefined ? {} : { proxy: p.pid }), 'load generator': process.pid }
    const r = await rps(p.url, p.key, pids)
    out[p.name] = r
    const cpu = Object.entries(r.cpu)
      .filter(([, us]) => us !== null)
      .map(([name, us]) => `${name} ${us.toFixed(1)}`)
      .join(', ')
    const failed = r.non2xx || r.errors ? ` (${r.non2xx} non-2xx, ${r.errors} errors)` : ''
    console.log(`  ${p.name.padEnd(7)} ${Math.round(r.rps)} req/s${cpu ? `; CPU µs per request: ${cpu}` : ''}${failed}`)
  }
  return out
}

async function main() {
  const fake = await startFakeGeminiProcess({ limits: HUGE, tokens: 100 })
  const fixed = await startFixed(await recorded(fake.url, KEYS[0]))
  const started = [fixed]
  try {
    const proxies = async (upstream) => {
      const [ours, node] = await Promise.all([startProxy('ours', upstream.url), startProxy('node', upstream.url)])
      started.push(ours, node)
      return [
        { name: 'direct', url: upstream.url, key: KEYS[0] },
        { name: 'ours', url: ours.url, key: TOKEN, pid: ours.pid },
        { name: 'node', url: node.url, key: TOKEN, pid: node.pid },
      ]
    }
    const onFake = await proxies({ url: fake.url })
    const onFixed = await proxies(fixed)
    const f = (ms) => `${ms.toFixed(3)} ms`
    const latency = await sequential(onFake, `/v1beta/models/${MODEL}:generateContent`, ([, all]) => all)
    console.log(`latency, generateContent, 1 connection, ${REQUESTS} requests per path, upstream fake:`)
    for (const p of onFake) {
      const l = latency[p.name]
      const added = p.name === 'direct' ? '' : `  added p50 ${f(l.p50 - latency.direct.p50)}, p99 ${f(l.p99 - latency.direct.p99)}`
      console.log(`  ${p.name.padEnd(7)} p50 ${f(l.p50)}  p99 ${f(l.p99)}${added}`)
    }
    const ttfb = await sequential(onFake, `/v1beta/models/${MODEL}:streamGenerateContent?alt=sse`, ([first]) => first)
    console.log('time to the first streamed byte, streamGenerateContent?alt=sse, upstream fake:')
    for (const p of onFake) console.log(`  ${p.name.padEnd(7)} p50 ${f(ttfb[p.name].p50)}  p99 ${f(ttfb[p.name].p99)}`)
    const cheap = await rates({ name: "fixed (bench/fixed-upstream: one Rust thread, the fake's bytes)", pid: fixed.pid }, onFixed)
    const capped = await rates({ name: 'fake (the fake Gemini, Node)', pid: fake.pid }, onFake)
    const added = latency.ours
    console.log(
      `goals: p50 added ${f(added.p50 - latency.direct.p50)} (<= 0.2 ms), p99 added ${f(added.p99 - latency.direct.p99)} (<= 1 ms), ` +
        `${(cheap.ours.rps / cheap.node.rps).toFixed(2)}x the Node proxy's requests per second on the fixed upstream (>= 3x); ` +
        `${(capped.ours.rps / capped.node.rps).toFixed(2)}x on the fake`,
    )
  } finally {
    await Promise.all([...started.map((s) => s.stop()), fake.close()])
  }
}

if (require.main === module) {
  const [kind, upstreamUrl] = process.argv.slice(2)
  if (kind === undefined) {
    main().catch((e) => {
      console.error(e)
      process.exitCode = 1
    })
  } else {
    const start = kind === 'ours' ? ourProxy : kind === 'node' ? nodeProxy : null
    if (start === null) throw new Error(`unknown proxy ${kind}: ours or node`)
    start(upstreamUrl).then((port) => {
      console.log(`READY ${port}`)
      process.stdin.resume()
      process.stdin.on('end', () => process.exit(0))
    })
  }
}

