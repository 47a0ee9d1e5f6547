'use strict'

// Issue 11 point 7, fault 6: `npm start` and signals. The script execs node, so SIGTERM or SIGINT
// sent to the npm process reaches the server, which answers the request in flight, closes the manager (its flush writes
// what changed) and exits 0; npm exits 0 too, and no node process is left behind.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const http = require('node:http')
const path = require('node:path')
const { PKG, mask } = require('../helpers')
const { FIXTURES, KEYS, alive, childrenOf, eventually, inspect, sleep, start, startNx } = require('./support')

/**
 * A request in flight: its head and the first byte of its body sent now, the rest on `finish()`.
 * `answer` resolves to its status.
 */
function slowRequest(url, path, headers) {
  const req = http.request(`${url}${path}`, {
    method: 'POST',
    agent: false,
    headers: { ...headers, 'content-type': 'application/json', 'content-length': 2 },
  })
  const answer = new Promise((resolve, reject) => {
    req.once('response', (res) => {
      res.resume()
      res.once('end', () => resolve(res.statusCode))
    })
    req.once('error', reject)
  })
  req.write('{')
  return { answer, finish: () => req.end('}') }
}

const { keyFingerprint } = require(PKG)

// With an admin token and without one (the endpoints below are then open, on loopback only).
for (const [signal, token] of [
  ['SIGTERM', 'fault-suite-admin-token-0123456789abcdef'],
  ['SIGINT', undefined],
]) {
  test(`${signal} to \`npm start\`${token ? ' (admin token set)' : ''}: node drains, flushes and exits 0, npm exits 0, no orphan`, async (t) => {
    const auth = token ? { authorization: `Bearer ${token}` } : {}
    const server = await startNx(t)
    const dbName = `gkm_npm_${signal.toLowerCase()}`
    const npm = start(t, 'npm', ['start'], {
      env: {
        GEMINI_API_KEYS: KEYS.join(','),
        PORT: '0',
        MONGODB_URI: server.uri,
        MONGODB_DB_NAME: dbName,
        // The bin has no setting for the flush interval: a long one, so that only the close's
        // flush can write the change below.
        NODE_OPTIONS: `--require ${path.join(FIXTURES, 'long-flush.js')}`,
        TEST_FLUSH_INTERVAL_MS: '600000',
        ...(token && { KEY_MANAGER_ADMIN_TOKEN: token }),
      },
    })
    const url = /listening on (http:\/\/\S+)\/api\/keys/.exec((await npm.waitFor(/listening on http/, 60000)).text)[1]
    // The script execs node: npm's one child is the server itself, not a shell.
    const [node, ...others] = childrenOf(npm.pid)
    assert.deepEqual(others, [])
    assert.match(fs.readFileSync(`/proc/${node}/cmdline`, 'utf8'), /^node\0bin\/gemini-key-manager\.js\0serve\0$/)

    // The token reached node through npm.
    if (token) assert.equal((await fetch(`${url}/api/keys/disable/${mask(KEYS[0])}`, { method: 'POST' })).status, 401)
    const res = await fetch(`${url}/api/keys/disable/${mask(KEYS[0])}`, { method: 'POST', headers: auth })
    assert.equal(res.status, 200, await res.text())
    const { admissions } = await inspect(t, server.uri, dbName)
    assert.equal(await admissions.countDocuments(), 0, 'not written before the signal')

    const inFlight = slowRequest(url, '/api/keys/refresh-cache', auth)
    // Its head has reached the server.
    await sleep(300)
    const signalled = Date.now()
    npm.signal(signal)
    await npm.waitFor(/^🛑 Shutting down/, 10000)
    await sleep(300)
    inFlight.finish()
    assert.equal(await inFlight.answer, 200, 'the request in flight at the signal is answered')
    const exit = await npm.waitExit(20000)
    const tookMs = exit.at - signalled
    assert.ok(await eventually(() => !alive(node), 5000), `node ${node} outlived npm`)
    await eventually(() => npm.closed, 5000)
    t.diagnostic(`${signal}: npm exited ${JSON.stringify({ code: exit.code, signal: exit.signal })} ${tookMs} ms after the signal; node ${node} gone`)
    assert.deepEqual([exit.code, exit.signal], [0, null], npm.output())
    const stored = await admissions.find().toArray()
    assert.deepEqual(
      stored.map((d) => [d.apiKey, d.admission]),
      [[keyFingerprint(KEYS[0]), 'disabled']],
      'the close wrote the change',
    )
  })
}
