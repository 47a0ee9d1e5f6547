'use strict'

// Issue 11 point 7, fault 5: a connection flood. Two processes (more under a lower descriptor
// limit) open 20,000 connections to the bin `serve` that never send a whole request head
// (slowloris); while they come in and while they are held, GET /api/keys/status on fresh
// connections is answered, every time and fast (at the cap of 4,096 a new connection takes the
// place of the oldest one without a head). Once the flood is over the server's memory returns near
// its idle figure (malloc_trim), flood after flood. Linux only: memory is read from /proc.

const test = require('node:test')
const assert = require('node:assert/strict')
const crypto = require('node:crypto')
const fs = require('node:fs')
const http = require('node:http')
const path = require('node:path')
const { KEYS, MB, eventually, rss, sleep, start, startFixture } = require('./support')

const BIN = path.resolve(__dirname, '..', '..', 'bin', 'gemini-key-manager.js')
const FLOOD = 20000
// At least two processes, each within its descriptor limit (20,000 on the development machine).
const FD_LIMIT = Number(/^Max open files\s+(\d+)/m.exec(fs.readFileSync('/proc/self/limits', 'utf8'))[1])
const FLOODERS = Math.max(2, Math.ceil(FLOOD / (FD_LIMIT - 256)))
const PER_FLOODER = Math.ceil(FLOOD / FLOODERS)
const ROUNDS = 3
const PROBES = 100
const PROBE_TIMEOUT_MS = 5000
// The last flood is held until the server's head timeout (10 s) has closed every connection left.
const HEAD_TIMEOUT_MS = 10000

/** One GET on a fresh connection: resolves to { status, ms }. */
function probe(port) {
  return new Promise((resolve, reject) => {
    const started = performance.now()
    const req = http.get({ host: '127.0.0.1', port, path: '/api/keys/status', agent: false, timeout: PROBE_TIMEOUT_MS }, (res) => {
      res.resume()
      res.once('end', () => resolve({ status: res.statusCode, ms: performance.now() - started }))
    })
    req.once('timeout', () => req.destroy(new Error(`no answer within ${PROBE_TIMEOUT_MS} ms`)))
    req.once('error', reject)
  })
}

async function probes(port) {
  const out = []
  for (let i = 0; i < PROBES; i++) out.push(await probe(port))
  return out
}

/** The nearest-rank percentile of sorted values. */
const percentile = (sorted, p) => sorted[Math.max(0, Math.ceil(sorted.length * p) - 1)]
const fixed = (ms) => (ms === undefined ? '-' : ms.toFixed(1))

test('20,000 slowloris connections: status answered within 100 ms (p99), memory back near idle after each flood', async (t) => {
  const server = start(t, process.execPath, [BIN, 'serve'], {
    env: { GEMINI_API_KEYS: KEYS.join(','), HOST: '127.0.0.1', PORT: '0' },
  })
  const port = Number(/listening on http:\/\/127\.0\.0\.1:(\d+)/.exec((await server.waitFor(/listening on http/, 30000)).text)[1])
  // Warm: the first requests allocate what every later one reuses.
  await probes(port)
  await sleep(1000)
  const idle = rss(server.pid)
  // Closed connections linger in TIME_WAIT for a minute: each flood comes from addresses of its
  // own (all of 127/8 is loopback), picked afresh each run, so none waits for another's ports.
  const subnet = crypto.randomInt(1, 255)
  const rounds = []
  for (let round = 0; round < ROUNDS; round++) {
    let peak = rss(server.pid)
    const sampler = setInterval(() => {
      peak = Math.max(peak, rss(server.pid))
    }, 50)
    const flooders = Array.from({ length: FLOODERS }, (_, i) =>
      startFixture(t, 'flooder.js', {
        host: '127.0.0.1',
        port,
        localAddress: `127.${subnet}.0.${2 + round * FLOODERS + i}`,
        count: PER_FLOODER,
        concurrency: 200,
      }),
    )
    // While the flood comes in, the server cutting the oldest connections to make room.
    const whileOpening = []
    let opening = true
    const prober = (async () => {
      while (opening) whileOpening.push(await probe(port).catch((e) => ({ status: e.message, ms: NaN })))
    })()
    const opened = []
    for (const f of flooders) opened.push(await f.json('OPENED', 120000))
    opening = false
    await prober
    const answers = await probes(port)
    const last = round === ROUNDS - 1
    let emptyAfterMs
    if (last) {
      const heldFrom = Date.now()
      for (const f of flooders) await f.waitFor(/^EMPTY$/, HEAD_TIMEOUT_MS + 20000)
      emptyAfterMs = Date.now() - heldFrom
    }
    for (const f of flooders) f.send('close')
    const results = []
    for (const f of flooders) results.push(await f.json('RESULT', 30000))
    for (const f of flooders) await f.waitExit(10000)
    // The server notices the closed connections, then hands memory back.
    await eventually(() => rss(server.pid) <= 2 * idle, 10000, 200)
    await sleep(500)
    clearInterval(sampler)
    const after = rss(server.pid)
    const ms = answers.map((a) => a.ms).sort((a, b) => a - b)
    const early = whileOpening.map((a) => a.ms).sort((a, b) => a - b)
    rounds.push({
      statuses: [...new Set(answers.map((a) => a.status))],
      opening: {
        n: whileOpening.length,
        statuses: [...new Set(whileOpening.map((a) => a.status))],
        p50: percentile(early, 0.5),
        p99: percentile(early, 0.99),
        max: early.at(-1),
      },
      p50: percentile(ms, 0.5),
      p99: percentile(ms, 0.99),
      max: ms.at(-1),
      peak,
      after,
      connected: opened.reduce((n, o) => n + o.connected, 0),
      failed: opened.reduce((n, o) => n + o.failed, 0),
      last,
      emptyAfterMs,
      cut: results.reduce((n, r) => n + r.cut.partial.n + r.cut.silent.n, 0),
      cutAfterMs: results.map((r) => r.cut),
      errors: results.map((r) => r.errors),
    })
  }
  t.diagnostic(
    `idle RSS ${MB(idle)}; ` +
      rounds
        .map(
          (r, i) =>
            `flood ${i + 1}${r.last ? ` (held until the server closed every one, ${r.emptyAfterMs} ms after they were all open)` : ''}: ` +
            `${r.connected} connected (${r.failed} failed, ` +
            `${r.cut} closed by the server, after ms ${JSON.stringify(r.cutAfterMs)}, ` +
            `errors ${JSON.stringify(r.errors)}); while it came in, ${r.opening.n} status requests: ${r.opening.statuses}, ` +
            `p50 ${fixed(r.opening.p50)} ms, p99 ${fixed(r.opening.p99)} ms, max ${fixed(r.opening.max)} ms; ` +
            `held: status ${r.statuses} p50 ${r.p50.toFixed(1)} ms, p99 ${r.p99.toFixed(1)} ms, ` +
            `max ${r.max.toFixed(1)} ms; RSS peak ${MB(r.peak)}, after ${MB(r.after)}`,
        )
        .join('; '),
  )
  assert.equal(server.exit, null, `the server died:\n${server.output()}`)
  for (const [i, r] of rounds.entries()) {
    assert.deepEqual(r.statuses, [200], `flood ${i + 1}: every status request answered 200`)
    assert.ok(r.opening.statuses.every((s) => s === 200), `flood ${i + 1}, while it came in: ${r.opening.statuses}`)
    assert.equal(r.connected + r.failed, FLOODERS * PER_FLOODER)
    assert.ok(r.p99 <= 100, `flood ${i + 1}: p99 ${r.p99.toFixed(1)} ms`)
    assert.ok(r.after <= 2 * idle, `flood ${i + 1}: RSS ${MB(r.after)} after, ${MB(idle)} idle`)
  }
})

test('a flood past the server\'s descriptor limit (hard limit 1024, under maxConnections 4096) does not lock clients out', {
  todo: 'at the descriptor limit accept() fails (EMFILE) before the cap can make room, so clients wait for the head timeout; ' +
    'the cap could be held under the limit',
}, async (t) => {
  // The hard limit too: node raises its soft limit to the hard one at start.
  const server = start(t, 'sh', ['-c', 'ulimit -n 1024 && exec "$0" "$@"', process.execPath, BIN, 'serve'], {
    env: { GEMINI_API_KEYS: KEYS.join(','), HOST: '127.0.0.1', PORT: '0' },
  })
  const port = Number(/listening on http:\/\/127\.0\.0\.1:(\d+)/.exec((await server.waitFor(/listening on http/, 30000)).text)[1])
  const flooder = startFixture(t, 'flooder.js', { host: '127.0.0.1', port, localAddress: `127.${crypto.randomInt(1, 255)}.1.2`, count: 2000, concurrency: 200 })
  // Once the server is out of descriptors, a client tries until it is answered.
  await server.waitFor(/could not accept a connection: Too many open files/, 30000)
  const from = Date.now()
  const tries = []
  while (Date.now() - from < 20000) {
    const answer = await probe(port).catch((e) => ({ status: e.message, ms: NaN }))
    tries.push(answer)
    if (answer.status === 200) break
  }
  const lockedOutMs = Date.now() - from
  flooder.send('close')
  const refused = server.lines.filter((l) => /could not accept a connection: Too many open files/.test(l.text)).length
  t.diagnostic(
    `2,000 slowloris connections at a 1,024 descriptor limit: the first status answered ${lockedOutMs} ms after the server ran out, ` +
      `after ${tries.length} tries (${tries.map((a) => a.status).join(', ')}); ${refused} accept failures logged`,
  )
  assert.equal(tries.at(-1).status, 200)
  assert.ok(lockedOutMs <= 1000, `clients locked out for ${lockedOutMs} ms`)
})
