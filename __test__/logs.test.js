'use strict'

// SPEC section 3 log lines, checked in a child process without `quiet`; and no full key is ever printed.

const test = require('node:test')
const assert = require('node:assert/strict')
const { runFixture, expectClean, fakeKey, mask, freePort } = require('./helpers')

const KEYS = [fakeKey(11), fakeKey(22), fakeKey(33)]

let cached
function run() {
  if (cached) return cached
  const r = runFixture('log-lines.js', { args: [JSON.stringify(KEYS)] })
  const out = expectClean(r, assert)
  assert.deepEqual(out, { init: true, refreshed: true })
  cached = r
  return r
}

function assertLine(lines, want) {
  assert.ok(lines.includes(want), `missing log line ${JSON.stringify(want)}; got:\n${lines.join('\n')}`)
}

/** A line that starts as the SPEC's does (ours may say more after it, e.g. how long the key rests). */
function assertLineStarting(lines, want) {
  assert.ok(
    lines.some((l) => l.startsWith(want)),
    `missing log line starting ${JSON.stringify(want)}; got:\n${lines.join('\n')}`,
  )
}

test("initialize logs '✅ In-memory API Key Manager initialized with N keys' once", () => {
  const { lines } = run()
  assertLine(lines, '✅ In-memory API Key Manager initialized with 3 keys')
  assert.equal(lines.filter((l) => l.includes('initialized with')).length, 1)
})

test("handleRateLimit logs '⚠️ Rate limit hit for RPM on API key <first 8>...<last 4>'", () => {
  const { lines } = run()
  assertLineStarting(lines, `⚠️ Rate limit hit for RPM on API key ${mask(KEYS[0])}`)
  assertLineStarting(lines, `⚠️ Rate limit hit for TPM on API key ${mask(KEYS[1])}`)
})

test("3 timeouts in a row log the circuit opening; a refused key logs '⚠️ API key deactivated due to N consecutive errors' once", () => {
  const { lines } = run()
  assertLineStarting(lines, `⚠️ API key ${mask(KEYS[2])} resting for 5.0s after 3 consecutive errors (circuit open)`)
  assertLineStarting(lines, '⚠️ API key deactivated due to 1 consecutive errors')
  assert.equal(lines.filter((l) => l.includes('deactivated due to')).length, 1)
})

test("refreshCache logs '✅ Cache refreshed successfully'", () => {
  const { lines } = run()
  assertLine(lines, '✅ Cache refreshed successfully')
})

test('no output line contains a full key or the hidden middle of a key', () => {
  const { lines } = run()
  assert.ok(lines.length >= 5)
  for (const line of lines) {
    for (const key of KEYS) {
      assert.ok(!line.includes(key), `a full key was printed: ${line}`)
      assert.ok(!line.includes(key.slice(8, -4)), `the hidden part of a key was printed: ${line}`)
    }
  }
})

test('quiet: true prints nothing at all', () => {
  const { spawnSync } = require('node:child_process')
  const { cleanEnv, PKG } = require('./helpers')
  const code = `
    const { ApiKeyManagerService } = require(${JSON.stringify(PKG)})
    const keys = ${JSON.stringify(KEYS)}
    ;(async () => {
      const m = new ApiKeyManagerService({ keys: [...keys, keys[0], ''], quiet: true })
      await m.initialize()
      await m.handleRateLimit(keys[0], 'RPM')
      for (let i = 0; i < 5; i++) await m.recordUsage(keys[1], 0, false, 'x', 1)
      await m.refreshCache()
    })()`
  const r = spawnSync(process.execPath, ['-e', code], { env: cleanEnv(), encoding: 'utf8' })
  assert.equal(r.status, 0, r.stderr)
  assert.equal(r.stdout, '')
  assert.equal(r.stderr, '')
})

test("the manager's lines and the application's come out in the order they were said, through console, at their levels", async () => {
  const said = expectClean(runFixture('log-order.js', { args: [JSON.stringify(KEYS), String(await freePort())] }), assert)
  const at = (start) => {
    const i = said.findIndex((l) => l.startsWith(start))
    assert.ok(i >= 0, `missing ${JSON.stringify(start)} in:\n${said.join('\n')}`)
    return i
  }
  // The store's outcome, said on another thread, is written before initialize() resolves.
  const order = [
    at('error ❌ MongoDB connection failed: '),
    at('log 🔄 Falling back to in-memory mode...'),
    at('log ✅ In-memory API Key Manager initialized with 3 keys'),
    at('app initialized'),
    at(`warn ⚠️ Rate limit hit for RPM on API key ${mask(KEYS[0])}`),
    at('app rate limited'),
  ]
  assert.deepEqual(order, [...order].sort((a, b) => a - b), said.join('\n'))
})
