'use strict'

// Shared by the test files (not a test file itself: node --test only runs *.test.js here).

const fs = require('node:fs')
const net = require('node:net')
const os = require('node:os')
const path = require('node:path')
const { spawnSync } = require('node:child_process')

const PKG = path.resolve(__dirname, '..')
const FIXTURES = path.join(__dirname, 'fixtures')

// Every manager a test file starts, and every process it spawns, spills into a directory of this
// test process's own: the default one is shared by every run on the machine and keyed by the URI
// and database name, which the test servers' ports and the tests' fixed names repeat, so a run
// could claim what another left there. A test that sets its own `spillDir` keeps it.
if (!process.env.KEY_MANAGER_SPILL_DIR) {
  const spillDir = fs.mkdtempSync(path.join(os.tmpdir(), 'gkm-test-spill-'))
  process.env.KEY_MANAGER_SPILL_DIR = spillDir
  process.on('exit', () => fs.rmSync(spillDir, { recursive: true, force: true }))
}

const FILLER = 'Qm7Lx2Vb9Rc4Nw8Dk1Fh6Jt3Ps' // 26 characters

/** A realistic fake Gemini key: 'AIzaSyTEST' + 25 filler characters + 'k' + 3 digits = 39 characters. */
function fakeKey(n) {
  const key = 'AIzaSyTEST' + FILLER.slice(0, 25) + 'k' + String(n).padStart(3, '0')
  if (key.length !== 39) throw new Error('fake key has the wrong length')
  return key
}

/** The SPEC's masked form of a key: its first 8 characters, '...', its last 4. */
function mask(key) {
  return `${key.slice(0, 8)}...${key.slice(-4)}`
}

/**
 * A usage-stats answer (getUsageStats' objects or the route's JSON) as plain JSON, for comparing
 * two answers: an empty window's reset time is now plus the window, so it moves with the clock
 * between two calls and is left out.
 */
function usageJson(answer) {
  return JSON.parse(JSON.stringify(answer), (name, value) =>
    value !== null && typeof value === 'object' && value.current === 0 && 'resetTime' in value
      ? { ...value, resetTime: '<moves with the clock>' }
      : value,
  )
}

/** Limits given explicitly, so in-process tests do not depend on GEMINI_*_LIMIT in the environment. */
const LIMITS = { rpm: 30, rpd: 200, tpm: 1000000 }

/** A fresh quiet manager over `n` fake keys. */
function newManager(n, limits = LIMITS) {
  const { ApiKeyManagerService } = require(PKG)
  const keys = Array.from({ length: n }, (_, i) => fakeKey(i + 1))
  return { m: new ApiKeyManagerService({ keys, limits, quiet: true }), keys }
}

/** The environment without this machine's GEMINI_* / MONGODB_* variables or the test runner's own. */
function cleanEnv(extra = {}) {
  const env = {}
  for (const [k, v] of Object.entries(process.env)) {
    if (/^(GEMINI_|MONGODB_|NODE_TEST_CONTEXT$|NODE_OPTIONS$)/.test(k)) continue
    env[k] = v
  }
  return { ...env, ...extra }
}

/**
 * Runs a fixture script in its own node process. Returns { status, stdout, stderr, lines, result },
 * where `result` is the JSON printed on the script's 'RESULT ' line (if any).
 */
function runFixture(file, { env = {}, args = [], cwd = FIXTURES } = {}) {
  const r = spawnSync(process.execPath, [path.join(FIXTURES, file), ...args], {
    cwd,
    env: cleanEnv(env),
    encoding: 'utf8',
    timeout: 60000,
  })
  if (r.error) throw r.error
  const lines = `${r.stdout}\n${r.stderr}`.split('\n').filter((l) => l !== '')
  const resultLine = r.stdout.split('\n').find((l) => l.startsWith('RESULT '))
  const result = resultLine === undefined ? undefined : JSON.parse(resultLine.slice('RESULT '.length))
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, lines, result }
}

/** Fails with the child's output when it did not exit cleanly or printed no result. */
function expectClean(run, assert) {
  assert.equal(run.status, 0, `child exited ${run.status}\nstdout:\n${run.stdout}\nstderr:\n${run.stderr}`)
  assert.ok(run.result !== undefined, `child printed no RESULT line\nstdout:\n${run.stdout}\nstderr:\n${run.stderr}`)
  return run.result
}

/**
 * Calls `fn` and checks the call neither threw synchronously nor returned anything but a Promise;
 * resolves to the Promise's value (a rejection fails the test through `await`).
 */
async function settle(fn) {
  let p
  try {
    p = fn()
  } catch (e) {
    throw new Error(`threw synchronously instead of returning a failure: ${e && e.stack}`)
  }
  if (!(p instanceof Promise)) throw new Error(`returned ${typeof p}, not a Promise`)
  try {
    return await p
  } catch (e) {
    throw new Error(`rejected instead of resolving to a failure: ${e && e.stack}`)
  }
}

/** Asserts `r` is the SPEC's failure shape: { success: false, error: <string>, metadata: object }. */
function assertFailure(assert, r, error) {
  assert.equal(typeof r, 'object')
  assert.equal(r.success, false, `expected a failure, got ${JSON.stringify(r)}`)
  assert.equal(typeof r.error, 'string')
  assert.ok(r.error.length > 0)
  assert.equal(typeof r.metadata, 'object')
  assert.ok(r.metadata !== null)
  if (error instanceof RegExp) assert.match(r.error, error)
  else if (error !== undefined) assert.equal(r.error, error)
}

/** Picks keys with getBestAvailableKey `n` times; returns the keys handed out (throws on a failure). */
async function pick(m, n) {
  const out = []
  for (let i = 0; i < n; i++) {
    const r = await m.getBestAvailableKey()
    if (!r.success) throw new Error(`getBestAvailableKey failed: ${r.error}`)
    out.push(r.data[0])
  }
  return out
}

/** The key's status object, as getAllKeysStatus lists it. */
async function statusOf(m, key) {
  const all = await m.getAllKeysStatus()
  if (!all.success) throw new Error(`getAllKeysStatus failed: ${all.error}`)
  return all.data.find((s) => s.apiKey === key)
}

/** A TCP port free on 127.0.0.1 right now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.on('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => resolve(port))
    })
  })
}

/** A small seeded PRNG (mulberry32): the same seed gives the same sequence. */
function prng(seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

module.exports = {
  freePort,
  prng,
  PKG,
  FIXTURES,
  LIMITS,
  fakeKey,
  mask,
  usageJson,
  newManager,
  cleanEnv,
  runFixture,
  expectClean,
  settle,
  assertFailure,
  pick,
  statusOf,
}
