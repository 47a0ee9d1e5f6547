'use strict'

// Issue 5 points 1-3 against a real MongoDB wire-protocol server (nx-27017, see shared/MONGO.md),
// which these tests start themselves on free ports and stop by PID: SPEC section 3's documents and
// indexes, written behind; restarts keep state; a database in the old service's shape loads; an
// unreachable server falls back fast with the SPEC's log lines; a server that comes up later, or
// goes away and comes back mid-run, ends up with every recorded call exactly once.

const test = require('node:test')
const assert = require('node:assert/strict')
const crypto = require('node:crypto')
const fs = require('node:fs')
const net = require('node:net')
const os = require('node:os')
const path = require('node:path')
const { spawn } = require('node:child_process')
const { MongoClient } = require('mongodb')
const { PKG, FIXTURES, fakeKey, mask, usageJson, runFixture, expectClean, cleanEnv, freePort } = require('./helpers')

const { ApiKeyManagerService, keyFingerprint, keyRoutes } = require(PKG)
const express = require('express')

const NX = path.join(PKG, '.venv-mongo', 'bin', 'nx-27017')
const KEYS = [fakeKey(51), fakeKey(52), fakeKey(53)]
// Keys are stored as fingerprints under this secret, here and in the child processes (cleanEnv
// keeps it).
const SECRET = 'test fingerprint secret, 32 bytes'
process.env.KEY_MANAGER_FINGERPRINT_SECRET = SECRET
delete process.env.KEY_MANAGER_STORE_PLAINTEXT_KEYS
const fp = (key) => keyFingerprint(key, SECRET)
const FPS = KEYS.map(fp)

/** `sha256_` and the first 128 bits of the key's SHA-256: its stored name without a secret. */
const digest = (key) => `sha256_${crypto.createHash('sha256').update(key).digest('hex').slice(0, 32)}`

/** No document of the database's key and usage collections holds any of `keys`. */
async function assertNoPlaintextKey(uri, dbName, keys = KEYS, form = /^fp_[0-9a-f]{32}$/) {
  const { keys: keyDocs, usage } = await inspect(uri, dbName)
  for (const c of [keyDocs, usage]) {
    for (const d of await c.find().toArray()) {
      const text = JSON.stringify(d)
      for (const k of keys) assert.ok(!text.includes(k), `a key in plaintext in ${c.collectionName}: ${text}`)
      assert.match(d.apiKey, form)
    }
  }
}
const LIMITS = { rpm: 30, rpd: 200, tpm: 1000000 }
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'gkm-mongo-test-'))

const servers = new Set()
const clients = []

test.after(async () => {
  for (const c of clients) await c.close().catch(() => {})
  for (const s of servers) s.stop()
  fs.rmSync(TMP, { recursive: true, force: true })
})

function canConnect(port) {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' })
    socket.setTimeout(300)
    socket.once('connect', () => {
      socket.destroy()
      resolve(true)
    })
    socket.once('error', () => resolve(false))
    socket.once('timeout', () => {
      socket.destroy()
      resolve(false)
    })
  })
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Waits up to `ms` for `check()` to be true; returns whether it became true. */
async function eventually(check, ms) {
  const deadline = Date.now() + ms
  while (Date.now() < deadline) {
    if (await check()) return true
    await sleep(50)
  }
  return check()
}

/** Starts nx-27017 on `port` with `db` ('memory' or a file) and waits until it accepts connections. */
async function startServer(port, db = 'memory') {
  assert.ok(fs.existsSync(NX), `${NX} is missing: run \`bash scripts/mongo-test-server.sh\``)
  const base = path.join(TMP, `nx-${port}-${Date.now()}`)
  const log = `${base}.log`
  // Its own pid file: with the default one, a second server refuses to start.
  const args = ['--db', db, '--host', '127.0.0.1', '-p', String(port), '--log-file', log, '--pid-file', `${base}.pid`]
  const child = spawn(NX, args, { stdio: 'ignore' })
  let exited = false
  child.once('exit', () => {
    exited = true
  })
  const server = {
    port,
    uri: `mongodb://127.0.0.1:${port}/?directConnection=true`,
    stop() {
      if (!exited) child.kill('SIGKILL')
      servers.delete(server)
    },
    /** Stops it and waits until the port is closed. */
    async stopAndWait() {
      const gone = new Promise((resolve) => (exited ? resolve() : child.once('exit', resolve)))
      server.stop()
      await gone
    },
  }
  servers.add(server)
  const up = await eventually(async () => !exited && (await canConnect(port)), 20000)
  assert.ok(up, `nx-27017 did not start on port ${port}: ${fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : ''}`)
  return server
}

async function inspect(uri, dbName) {
  const client = new MongoClient(uri, { serverSelectionTimeoutMS: 5000 })
  await client.connect()
  clients.push(client)
  const db = client.db(dbName)
  return { client, db, keys: db.collection('api_keys'), usage: db.collection('api_key_usage') }
}

function manager(uri, dbName, extra = {}) {
  return new ApiKeyManagerService({
    keys: KEYS,
    limits: LIMITS,
    quiet: true,
    mongodbUri: uri,
    mongodbDbName: dbName,
    flushIntervalMs: 100,
    ...extra,
  })
}

async function distinctIds(collection) {
  return new Set((await collection.find({}, { projection: { _id: 1 } }).toArray()).map((d) => String(d._id))).size
}

async function statuses(m) {
  const r = await m.getAllKeysStatus()
  assert.ok(r.success, r.error)
  return Object.fromEntries(r.data.map((s) => [s.apiKey, s]))
}

let shared
async function sharedServer() {
  shared ??= startServer(await freePort())
  return shared
}

test('with MONGODB_URI, state is written behind into the documents and indexes of SPEC section 3', async () => {
  const server = await sharedServer()
  const dbName = 'gkm_shape'
  const m = manager(server.uri, dbName)
  const init = await m.initialize()
  assert.equal(init.success, true)
  assert.deepEqual(init.metadata, { totalKeys: 3 })
  for (let i = 0; i < 4; i++) {
    const r = await m.getBestAvailableKey()
    assert.ok(r.success)
    await m.recordUsage(r.data[0], 100 + i, true, undefined, 120 + i)
  }
  await m.recordUsage(KEYS[2], 0, false, new Error('503 Service Unavailable'), 45.5)
  const { db, keys, usage } = await inspect(server.uri, dbName)
  // Written behind, without waiting for close().
  assert.ok(await eventually(async () => (await usage.countDocuments()) === 5, 5000), 'usage written within 5 s')
  await m.close()

  const docs = await keys.find().toArray()
  // Keys are stored as their fingerprints.
  assert.deepEqual(docs.map((d) => d.apiKey).sort(), [...FPS].sort())
  for (const d of docs) {
    assert.equal(typeof d.isActive, 'boolean')
    assert.ok(d.lastUsed instanceof Date)
    assert.equal(typeof d.errorCount, 'number')
    for (const w of ['rpm', 'rpd', 'tpm']) {
      assert.equal(typeof d.limits[w].current, 'number')
      assert.equal(d.limits[w].limit, LIMITS[w])
      assert.ok(d.limits[w].resetTime instanceof Date)
    }
  }
  const failed = docs.find((d) => d.apiKey === FPS[2])
  assert.equal(failed.errorCount, 1)
  assert.match(failed.lastError, /503/)
  assert.ok(failed.lastErrorTime instanceof Date)
  assert.equal(docs.reduce((n, d) => n + d.limits.rpd.current, 0), 4)
  assert.equal(docs.reduce((n, d) => n + d.limits.tpm.current, 0), 100 + 101 + 102 + 103)

  const calls = await usage.find().sort({ timestamp: 1 }).toArray()
  assert.equal(calls.length, 5)
  assert.deepEqual(
    calls.filter((c) => c.success).map((c) => [c.tokensUsed, c.responseTime]).sort(),
    [
      [100, 120],
      [101, 121],
      [102, 122],
      [103, 123],
    ],
  )
  const bad = calls.find((c) => !c.success)
  assert.equal(bad.apiKey, FPS[2])
  assert.equal(bad.responseTime, 45.5)
  assert.match(bad.error, /503/)
  for (const c of calls) assert.ok(c.timestamp instanceof Date && FPS.includes(c.apiKey))
  await assertNoPlaintextKey(server.uri, dbName)

  const indexKeys = async (c) => (await c.indexes()).map((i) => [JSON.stringify(i.key), i.unique === true])
  const keyIndexes = await indexKeys(keys)
  assert.ok(keyIndexes.some(([k, u]) => k === '{"apiKey":1}' && u), JSON.stringify(keyIndexes))
  assert.ok(keyIndexes.some(([k]) => k === '{"isActive":1}'))
  assert.ok(keyIndexes.some(([k]) => k === '{"lastUsed":1}'))
  const usageIndexes = await indexKeys(usage)
  for (const field of ['apiKey', 'timestamp', 'success']) {
    assert.ok(usageIndexes.some(([k]) => k === `{"${field}":1}`), `${field}: ${JSON.stringify(usageIndexes)}`)
  }
  assert.ok((await db.listCollections().toArray()).length >= 2)
})

test('a restarted manager (new process, then new instance) keeps counters, error counts, deactivations and usage history', async () => {
  const server = await sharedServer()
  const dbName = 'gkm_restart'
  // A process that records and ends by itself without close(): its exit hook flushes.
  const plan = {
    flushIntervalMs: 60000,
    usage: [
      [0, 100, true, null, 10],
      [0, 100, true, null, 11],
      [0, 100, true, null, 12],
      [1, 0, false, 'API key not valid. Please pass a valid API key. [API_KEY_INVALID]', 5],
      [2, 0, false, '503 Service Unavailable', 7],
      [2, 0, false, '503 Service Unavailable', 8],
    ],
  }
  const run = runFixture('mongo-client.js', {
    args: [JSON.stringify(KEYS), JSON.stringify(plan)],
    env: { MONGODB_URI: server.uri, MONGODB_DB_NAME: dbName },
  })
  const out = expectClean(run, assert)
  assert.deepEqual(out.metadata, { totalKeys: 3 })
  const { usage } = await inspect(server.uri, dbName)
  assert.equal(await usage.countDocuments(), 6, 'the exit hook flushed every recorded call')

  const m = manager(server.uri, dbName)
  await m.initialize()
  const s = await statuses(m)
  assert.deepEqual(
    [s[KEYS[0]].limits.rpm.current, s[KEYS[0]].limits.rpd.current, s[KEYS[0]].limits.tpm.current],
    [3, 3, 300],
  )
  assert.equal(s[KEYS[1]].isActive, false)
  assert.equal(s[KEYS[1]].errorCount, 1)
  assert.equal(s[KEYS[2]].errorCount, 2)
  assert.match(s[KEYS[2]].lastError, /503/)
  assert.ok(s[KEYS[2]].lastErrorTime instanceof Date)
  const picked = await m.getBestAvailableKey()
  assert.notEqual(picked.data[0], KEYS[1], 'a deactivated key stays out')
  await m.recordUsage(KEYS[0], 50, true, undefined, 9)
  await m.close()

  const again = manager(server.uri, dbName)
  await again.initialize()
  const t = await statuses(again)
  assert.equal(t[KEYS[0]].limits.rpd.current, 4)
  assert.equal(t[KEYS[1]].isActive, false)
  await again.close()
  assert.equal(await usage.countDocuments(), 7)
  assert.equal(await distinctIds(usage), 7)
})

test('SIGTERM flushes before the process ends', async () => {
  const server = await sharedServer()
  const dbName = 'gkm_sigterm'
  const plan = { flushIntervalMs: 60000, wait: true, usage: [[0, 10, true, null, 1], [1, 20, true, null, 2]] }
  const child = spawn(process.execPath, [path.join(FIXTURES, 'mongo-client.js'), JSON.stringify(KEYS), JSON.stringify(plan)], {
    env: cleanEnv({ MONGODB_URI: server.uri, MONGODB_DB_NAME: dbName }),
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let stdout = ''
  child.stdout.on('data', (d) => (stdout += d))
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
  assert.ok(await eventually(() => stdout.includes('RESULT '), 15000), `no RESULT: ${stdout}`)
  child.kill('SIGTERM')
  const timer = setTimeout(() => child.kill('SIGKILL'), 10000)
  const { signal } = await exited
  clearTimeout(timer)
  assert.equal(signal, 'SIGTERM')
  const { usage } = await inspect(server.uri, dbName)
  assert.equal(await usage.countDocuments(), 2)
})

test("a database written by the old service loads (windows whose resetTime passed start fresh) and migrates to fingerprints", async () => {
  const server = await sharedServer()
  const dbName = 'gkm_old_shape'
  const { keys, usage } = await inspect(server.uri, dbName)
  const now = Date.now()
  const past = new Date(now - 120000)
  const future = new Date(now + 3600000)
  await keys.insertMany([
    {
      apiKey: KEYS[0],
      isActive: true,
      lastUsed: new Date(now - 5000),
      limits: {
        rpm: { current: 30, limit: 30, resetTime: past },
        rpd: { current: 150, limit: 200, resetTime: future },
        tpm: { current: 5000, limit: 1000000, resetTime: past },
      },
      errorCount: 0,
      __v: 0,
    },
    {
      apiKey: KEYS[1],
      isActive: false,
      lastUsed: new Date(now - 1000),
      limits: {
        rpm: { current: 4, limit: 30, resetTime: new Date(now + 30000) },
        rpd: { current: 20, limit: 200, resetTime: past },
        tpm: { current: 800, limit: 1000000, resetTime: new Date(now + 30000) },
      },
      errorCount: 5,
      lastError: 'Request failed with status code 403',
      lastErrorTime: new Date(now - 1000),
    },
  ])
  // The old service's usage documents: keys in plaintext, one quoted in an error message.
  await usage.insertMany([
    { apiKey: KEYS[0], timestamp: new Date(now - 4000), tokensUsed: 10, success: true, responseTime: 100 },
    { apiKey: KEYS[1], timestamp: new Date(now - 3000), tokensUsed: 0, success: false, error: `403 for key ${KEYS[1]}`, responseTime: 50 },
  ])
  const m = manager(server.uri, dbName)
  assert.deepEqual((await m.initialize()).metadata, { totalKeys: 3 })
  const s = await statuses(m)
  const counts = (k) => [s[k].limits.rpm.current, s[k].limits.rpd.current, s[k].limits.tpm.current]
  assert.deepEqual(counts(KEYS[0]), [0, 150, 0])
  assert.deepEqual(counts(KEYS[1]), [4, 0, 800])
  assert.deepEqual(counts(KEYS[2]), [0, 0, 0])
  assert.equal(s[KEYS[1]].isActive, false)
  assert.equal(s[KEYS[1]].errorCount, 5)
  assert.equal(s[KEYS[1]].lastError, 'Request failed with status code 403')
  assert.equal(s[KEYS[0]].lastUsed.getTime(), now - 5000)
  // The migrated usage is what the statistics read.
  const stats = await m.getUsageStats()
  assert.equal(stats.metadata.source, 'mongodb')
  assert.deepEqual(
    stats.data.map((k) => [k.requests, k.failures, k.tokens]),
    [
      [1, 0, 10],
      [1, 1, 0],
      [0, 0, 0],
    ],
  )
  await m.close()
  // One document per key, under its fingerprint; no key in plaintext anywhere, error messages
  // masked.
  const docs = await keys.find().toArray()
  assert.deepEqual(docs.map((d) => d.apiKey).sort(), [...FPS].sort())
  await assertNoPlaintextKey(server.uri, dbName)
  const failed = await usage.findOne({ success: false })
  assert.equal(failed.apiKey, FPS[1])
  assert.equal(failed.error, `403 for key ${mask(KEYS[1])}`)
  assert.equal(await usage.countDocuments(), 2)
})

test('MONGODB_URI and MONGODB_DB_NAME alone persist, with keys stored as SHA-256 digests and no secret', async () => {
  const server = await sharedServer()
  const dbName = 'gkm_no_secret'
  const env = { MONGODB_URI: server.uri, MONGODB_DB_NAME: dbName, KEY_MANAGER_FINGERPRINT_SECRET: '' }
  const first = runFixture('mongo-client.js', {
    args: [JSON.stringify(KEYS), JSON.stringify({ close: true, usage: [[0, 1, true, null, 1], [1, 0, false, 'API_KEY_INVALID', 2]] })],
    env,
  })
  const out = expectClean(first, assert)
  assert.deepEqual(out.metadata, { totalKeys: 3 })
  assert.ok(first.lines.includes('✅ MongoDB connection established for API key management'), first.lines.join('\n'))
  const { keys, usage } = await inspect(server.uri, dbName)
  assert.deepEqual((await keys.find().toArray()).map((d) => d.apiKey).sort(), KEYS.map(digest).sort())
  assert.equal(await usage.countDocuments(), 2)
  await assertNoPlaintextKey(server.uri, dbName, KEYS, /^sha256_[0-9a-f]{32}$/)
  // A second run with the same two variables finds the state: the refused key stays out.
  const second = runFixture('mongo-client.js', {
    args: [JSON.stringify(KEYS), JSON.stringify({ close: true, statuses: true })],
    env,
  })
  const again = expectClean(second, assert)
  assert.deepEqual(again.active, [true, false, true])
  assert.equal(again.rpd[0], 1)
})

test('keys added, removed, disabled and enabled at run time reach every process sharing the database', async () => {
  const server = await sharedServer()
  const dbName = 'gkm_key_admin'
  const added = fakeKey(61)
  const options = { keySyncIntervalMs: 200 }
  const [a, b] = [manager(server.uri, dbName, options), manager(server.uri, dbName, options)]
  assert.ok((await a.initialize()).success && (await b.initialize()).success)
  const listed = async (m) => (await m.getAllKeysStatus()).data.map((s) => [s.apiKey, s.state])
  const r = await a.addKey(added)
  assert.ok(r.success, r.error)
  assert.equal(r.data.apiKey, added)
  assert.equal((await a.addKey(added)).error, 'API key already exists')
  assert.match((await a.addKey('two words')).error, /^Invalid API key: /)
  assert.ok(await eventually(async () => (await listed(b)).some(([k]) => k === added), 5000), 'b took in the added key')
  // b hands it out and records a call on it; then disables another key and removes the new one.
  await b.recordUsage(added, 7, true, undefined, 3)
  assert.ok((await b.disableKey(KEYS[0])).success)
  assert.ok((await b.removeKey(added)).success)
  assert.ok(
    await eventually(async () => {
      const seen = await listed(a)
      return !seen.some(([k]) => k === added) && seen.some(([k, state]) => k === KEYS[0] && state === 'disabled')
    }, 5000),
    JSON.stringify(await listed(a)),
  )
  assert.equal((await a.getRateLimitInfo(added)).error, 'API key not found')
  for (let i = 0; i < 10; i++) {
    // A burst on a process that was idle may outrun its lease for a moment: it says until when.
    let best = await a.getBestAvailableKey()
    for (let tries = 0; !best.success && best.metadata.nextAvailableAt && tries < 50; tries++) {
      await sleep(Math.max(1, best.metadata.nextAvailableAt - Date.now()))
      best = await a.getBestAvailableKey()
    }
    assert.ok(best.success, best.error)
    assert.ok(best.data[0] !== KEYS[0] && best.data[0] !== added, mask(best.data[0]))
  }
  assert.ok((await a.enableKey(KEYS[0])).success)
  assert.ok(await eventually(async () => (await listed(b)).some(([k, state]) => k === KEYS[0] && state === 'active'), 5000))
  await a.close()
  await b.close()
  // The removed key's usage history stays, and no document holds a key readable.
  const { db, usage } = await inspect(server.uri, dbName)
  assert.equal(await usage.countDocuments({ apiKey: fp(added) }), 1)
  const decisions = await db.collection('api_key_admissions').find().toArray()
  assert.equal(decisions.length, 2)
  for (const d of decisions) {
    const text = JSON.stringify(d)
    for (const k of [...KEYS, added]) assert.ok(!text.includes(k), text)
  }
  // A process started later takes in the same decisions, the sealed key included (removed).
  const c = manager(server.uri, dbName)
  assert.ok((await c.initialize()).success)
  assert.deepEqual((await listed(c)).map(([, state]) => state), ['active', 'active', 'active'])
  const stats = await c.getUsageStats()
  const removed = stats.data.find((k) => k.removed)
  assert.equal(removed.apiKey, mask(added))
  assert.equal(removed.requests, 1)
  await c.close()
})

test('without a secret, a key added at run time would be lost to other processes: refused with the reason', async () => {
  const server = await sharedServer()
  const m = manager(server.uri, 'gkm_add_no_secret', { fingerprintSecret: undefined })
  const saved = process.env.KEY_MANAGER_FINGERPRINT_SECRET
  delete process.env.KEY_MANAGER_FINGERPRINT_SECRET
  try {
    assert.ok((await m.initialize()).success)
    const r = await m.addKey(fakeKey(62))
    assert.equal(r.success, false)
    assert.match(r.error, /^API key cannot be stored: .*KEY_MANAGER_FINGERPRINT_SECRET/)
    assert.equal((await m.getAllKeysStatus()).data.length, 3)
  } finally {
    process.env.KEY_MANAGER_FINGERPRINT_SECRET = saved
    await m.close()
  }
})

test('storePlaintextKeys: true stores keys as the old service did', async () => {
  const server = await sharedServer()
  const dbName = 'gkm_plaintext'
  const m = manager(server.uri, dbName, { storePlaintextKeys: true })
  assert.deepEqual((await m.initialize()).metadata, { totalKeys: 3 })
  await m.recordUsage(KEYS[1], 5, true, undefined, 3)
  await m.close()
  const { keys, usage } = await inspect(server.uri, dbName)
  assert.deepEqual((await keys.find().toArray()).map((d) => d.apiKey).sort(), [...KEYS].sort())
  assert.equal((await usage.findOne()).apiKey, KEYS[1])
})

test('usage statistics come from the usage collection: getUsageStats, the Rust server and the Express adapter', async () => {
  const server = await sharedServer()
  const dbName = 'gkm_usage_stats'
  const { usage } = await inspect(server.uri, dbName)
  // Calls made by an earlier run, yesterday and an hour ago: only the database knows them.
  const hour = 3600000
  const now = Date.now()
  await usage.insertMany([
    { apiKey: FPS[0], timestamp: new Date(now - 24 * hour), tokensUsed: 1000, success: true, responseTime: 900 },
    { apiKey: FPS[0], timestamp: new Date(now - hour), tokensUsed: 10, success: true, responseTime: 100 },
    { apiKey: FPS[0], timestamp: new Date(now - hour), tokensUsed: 20, success: false, error: '503', responseTime: 300 },
    { apiKey: FPS[2], timestamp: new Date(now - hour), tokensUsed: 5, success: true, responseTime: 200 },
    { apiKey: fp(fakeKey(99)), timestamp: new Date(now - hour), tokensUsed: 5, success: true, responseTime: 1 },
  ])
  const m = manager(server.uri, dbName)
  await m.initialize()
  const since = new Date(now - 2 * hour)
  const r = await m.getUsageStats({ startDate: since })
  assert.ok(r.success, r.error)
  assert.equal(r.metadata.source, 'mongodb')
  assert.ok(r.metadata.startDate instanceof Date)
  assert.equal(r.metadata.startDate.getTime(), since.getTime())
  assert.equal(r.metadata.endDate, null)
  const a = r.data[0]
  assert.equal(a.apiKey, mask(KEYS[0]))
  assert.ok(a.lastUsed instanceof Date)
  assert.deepEqual([a.requests, a.successes, a.failures, a.errorRate, a.tokens], [2, 1, 1, 0.5, 30])
  // Summed by the database in latency buckets of 1%: percentiles within half a percent.
  const near = (got, want) => assert.ok(Math.abs(got - want) <= 0.0051 * (want + 1), `${got} is not about ${want}`)
  near(a.p50ResponseTime, 100)
  near(a.p95ResponseTime, 300)
  assert.deepEqual([r.metadata.totals.requests, r.metadata.totals.tokens], [3, 35])
  near(r.metadata.totals.p50ResponseTime, 200)
  assert.equal((await m.getUsageStats()).metadata.totals.requests, 4)
  const bad = await m.getUsageStats({ startDate: new Date(now), endDate: new Date(now - hour) })
  assert.equal(bad.success, false)
  assert.match(bad.error, /^Invalid date range/)

  const query = `/usage-stats?startDate=${encodeURIComponent(since.toISOString())}`
  const served = await m.serve({ port: 0 })
  const app = express()
  app.use('/api/keys', keyRoutes(m))
  const viaExpress = await new Promise((resolve) => {
    const s = app.listen(0, '127.0.0.1', () => resolve(s))
  })
  try {
    for (const base of [`${served.url}/api/keys`, `http://127.0.0.1:${viaExpress.address().port}/api/keys`]) {
      const res = await fetch(base + query)
      assert.equal(res.status, 200, base)
      const body = await res.json()
      assert.equal(body.metadata.source, 'mongodb', base)
      assert.equal(body.data[0].requests, 2, base)
      assert.equal(body.metadata.totals.requests, 3, base)
      // The same answer as getUsageStats gives as objects, for the same range.
      const native = await m.getUsageStats({ startDate: since })
      assert.deepEqual(usageJson({ ...native, message: body.message }), usageJson(body), base)
      assert.equal('callLogCapacity' in native.metadata, false)
      assert.equal((await fetch(`${base}/usage-stats?endDate=nope`)).status, 400, base)
    }
  } finally {
    viaExpress.close()
    await served.close()
    await m.close()
  }
})

test('the SPEC log lines: connected, and an unreachable server that falls back within about 2 s', async () => {
  const server = await sharedServer()
  const connected = runFixture('mongo-client.js', {
    args: [JSON.stringify(KEYS), JSON.stringify({ close: true })],
    env: { MONGODB_URI: server.uri, MONGODB_DB_NAME: 'gkm_logs' },
  })
  const ok = expectClean(connected, assert)
  assert.deepEqual(ok.metadata, { totalKeys: 3 })
  assert.ok(connected.lines.includes('✅ MongoDB connection established for API key management'), connected.lines.join('\n'))
  assert.ok(connected.lines.includes('✅ API Key Manager initialized with 3 keys'), connected.lines.join('\n'))
  assert.ok(!connected.lines.some((l) => l.includes('In-memory')))

  const down = runFixture('mongo-client.js', {
    args: [JSON.stringify(KEYS), JSON.stringify({ close: true, usage: [[0, 1, true, null, 1]] })],
    env: { MONGODB_URI: `mongodb://127.0.0.1:${await freePort()}` },
  })
  const fell = expectClean(down, assert)
  assert.deepEqual(fell.metadata, { totalKeys: 3, mode: 'in-memory' })
  assert.ok(fell.elapsedMs < 3000, `fell back after ${fell.elapsedMs} ms`)
  // '❌ <reason>' goes to stderr, before the two stdout lines.
  const all = down.lines.join('\n')
  assert.match(down.stderr, /^❌ MongoDB connection failed: \S/m, all)
  const out = down.stdout.split('\n')
  const at = (line) => out.indexOf(line)
  assert.ok(at('🔄 Falling back to in-memory mode...') >= 0, all)
  assert.ok(at('✅ In-memory API Key Manager initialized with 3 keys') > at('🔄 Falling back to in-memory mode...'), all)
  assert.ok(!down.lines.some((l) => l.includes('mongodb://')), 'the URI is not logged')
})

test('fallback and recovery: a server that comes up later, then goes away and comes back mid-run, gets every call exactly once', async () => {
  const port = await freePort()
  const file = path.join(TMP, 'recovery.db')
  const uri = `mongodb://127.0.0.1:${port}/?directConnection=true`
  const dbName = 'gkm_recovery'
  // What another run left: key 0 has 50 requests today.
  let server = await startServer(port, file)
  {
    const { keys, client } = await inspect(uri, dbName)
    const future = new Date(Date.now() + 3600000)
    const w = (current, limit) => ({ current, limit, resetTime: future })
    // In plaintext, as the old service left it: migrated when the manager connects.
    await keys.insertOne({
      apiKey: KEYS[0],
      isActive: true,
      lastUsed: new Date(),
      limits: { rpm: w(0, 30), rpd: w(50, 200), tpm: w(0, 1000000) },
      errorCount: 0,
    })
    await client.close()
  }
  await server.stopAndWait()

  const m = manager(uri, dbName, { mongoConnectTimeoutMs: 500, mongoRetryIntervalMs: 200 })
  const started = Date.now()
  const init = await m.initialize()
  assert.ok(Date.now() - started < 2500)
  assert.equal(init.metadata.mode, 'in-memory')
  let recorded = 0
  const record = async (i, n) => {
    for (let j = 0; j < n; j++) {
      const r = await m.recordUsage(KEYS[i], 10, true, undefined, 5)
      assert.ok(r.success)
      recorded++
    }
  }
  await record(0, 10)
  await record(1, 5)
  assert.equal((await statuses(m))[KEYS[0]].limits.rpd.current, 10)

  server = await startServer(port, file)
  assert.ok(await eventually(() => m.persistenceStats().connected, 15000), 'reconnected in the background')
  // Merged: the stored 50 is more than the 10 made meanwhile.
  assert.equal((await statuses(m))[KEYS[0]].limits.rpd.current, 50)
  const { usage } = await inspect(uri, dbName)
  assert.ok(await eventually(async () => (await usage.countDocuments()) === 15, 5000), 'queued calls written')

  // Gone mid-run: calls keep being answered from memory, and their records wait.
  await server.stopAndWait()
  const t = Date.now()
  await record(2, 5)
  await record(0, 2)
  assert.ok(Date.now() - t < 500, 'recordUsage never waits for the database')
  assert.ok(await eventually(() => !m.persistenceStats().connected, 5000), 'the failed write is noticed')
  server = await startServer(port, file)
  assert.ok(await eventually(() => m.persistenceStats().connected, 15000), 'writes resumed')
  await record(1, 3)
  await m.close()
  const stats = m.persistenceStats()
  assert.deepEqual([stats.queued, stats.pending, stats.dropped], [0, 0, 0])

  const check = await inspect(uri, dbName)
  assert.equal(await check.usage.countDocuments(), recorded)
  assert.equal(await distinctIds(check.usage), recorded)
  const byKey = Object.fromEntries((await check.keys.find().toArray()).map((d) => [d.apiKey, d]))
  assert.equal(Object.keys(byKey).length, 3)
  assert.equal(byKey[FPS[0]].limits.rpd.current, 52)
  assert.equal(byKey[FPS[1]].limits.rpd.current, 8)
  assert.equal(byKey[FPS[2]].limits.rpd.current, 5)
  await assertNoPlaintextKey(uri, dbName)
})

/** Runs a fixture without blocking the event loop; resolves to what runFixture returns. */
function runFixtureAsync(file, { env = {}, args = [] } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(FIXTURES, file), ...args], { env: cleanEnv(env) })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    const timer = setTimeout(() => child.kill('SIGKILL'), 60000)
    child.once('error', reject)
    child.once('exit', (status) => {
      clearTimeout(timer)
      const line = stdout.split('\n').find((l) => l.startsWith('RESULT '))
      const result = line === undefined ? undefined : JSON.parse(line.slice('RESULT '.length))
      resolve({ status, stdout, stderr, result })
    })
  })
}

test('four processes at concurrency 20 over three keys at RPM 30 stay within every key\'s limit in every window, fixed and rolling', async (t) => {
  // Its own server: the processes are configured with MONGODB_URI alone (no database name, no
  // secret), as the old service documents it, so they use its default database.
  const server = await startServer(await freePort())
  const dbName = 'rag_db'
  const windowMs = 2000
  // Starts on a window boundary, once every process has had time to connect, and runs 4 windows.
  const startAt = Math.ceil((Date.now() + 3000) / windowMs) * windowMs
  const plan = { windowMs, concurrency: 20, startAt, endAt: startAt + 4 * windowMs }
  const runs = await Promise.all(
    Array.from({ length: 4 }, () =>
      runFixtureAsync('shared-quota-worker.js', {
        env: { MONGODB_URI: server.uri, KEY_MANAGER_FINGERPRINT_SECRET: '' },
        args: [JSON.stringify(KEYS), JSON.stringify(plan)],
      }),
    ),
  )
  const results = runs.map((run) => expectClean(run, assert))

  // What the processes report, per key, as the pool stamps its hand-outs.
  const stamps = KEYS.map(() => [])
  for (const { handouts } of results) for (const [key, stamp] of handouts) stamps[key].push(stamp)
  for (const s of stamps) s.sort((a, b) => a - b)
  // Rolling windows: no span of windowMs, wherever it starts, holds more than a key's 30.
  stamps.forEach((s, key) => {
    for (let i = 0, j = 0; i < s.length; i++) {
      while (j < s.length && s[j] < s[i] + windowMs) j++
      assert.ok(j - i <= 30, `key ${key}: ${j - i} hand-outs in the ${windowMs} ms from ${s[i]}`)
    }
  })
  // Fixed windows too, and the limit is used, not just respected: the callers ask for far more.
  const totals = new Map()
  for (const s of stamps) {
    for (const stamp of s) {
      const w = Math.floor(stamp / windowMs) * windowMs
      totals.set(w, (totals.get(w) ?? 0) + 1)
    }
  }
  for (const [window, n] of totals) assert.ok(n <= 90, `${n} hand-outs in the window from ${window}`)
  const full = [...totals.entries()].filter(([w]) => Number(w) >= startAt && Number(w) + windowMs <= plan.endAt)
  assert.equal(full.length, 4, JSON.stringify([...totals]))
  // Slices of 500 ms, any 2 s overlapping 5 of them: at saturation 4 slices' worth of 5 a window.
  for (const [window, n] of full) assert.ok(n >= 60, `only ${n} hand-outs in the window from ${window}`)
  t.diagnostic(`hand-outs per window: ${full.map(([, n]) => n).join(', ')}; per process: ${results.map((r) => r.handouts.length).join(', ')}`)
  for (const { handouts, stats } of results) {
    assert.ok(handouts.length > 0, 'every process was served')
    assert.ok(stats.peers >= 2 && stats.peers <= 4, `peers: ${stats.peers}`)
  }

  // What the database holds: each key's ledger of slices, no 5 slices in a row granted more than
  // 30, each slice granted at least what was handed out in it; one usage document per hand-out.
  const { db, usage } = await inspect(server.uri, dbName)
  const ledgers = await db.collection('api_key_leases').find({ window: 'rpm' }).toArray()
  assert.equal(ledgers.length, 3)
  for (const d of ledgers) {
    // Keys are stored as digests (no secret is set), in lease documents too.
    assert.ok(!KEYS.some((k) => JSON.stringify(d).includes(k)), `ledger ${d._id} holds a plaintext key`)
    const key = KEYS.findIndex((k) => d.apiKey === digest(k))
    assert.ok(key >= 0, d.apiKey)
    const slices = new Map(Object.entries(d.slices).map(([s, n]) => [Number(s), Number(n)]))
    for (const first of slices.keys()) {
      let run = 0
      for (let s = first; s < first + 5; s++) run += slices.get(s) ?? 0
      assert.ok(run <= 30, `key ${key}: ${run} granted in the 5 slices from ${first}`)
    }
    const handed = new Map()
    for (const stamp of stamps[key]) handed.set(Math.floor(stamp / 500), (handed.get(Math.floor(stamp / 500)) ?? 0) + 1)
    for (const [slice, n] of handed) {
      // The ledger keeps the recent slices only; older ones have been checked as they went.
      if (slice >= Math.min(...slices.keys())) assert.ok((slices.get(slice) ?? 0) >= n, `slice ${slice}: ${n} handed out, ${slices.get(slice)} granted`)
    }
  }
  const handedOut = results.reduce((sum, r) => sum + r.handouts.length, 0)
  assert.equal(await usage.countDocuments({}), handedOut)
})

test('sharedQuota: on by default with MongoDB, off on request, and it must be a boolean', async () => {
  const server = await sharedServer()
  const on = manager(server.uri, 'gkm_shared_option')
  assert.ok((await on.initialize()).success)
  assert.equal(on.persistenceStats().peers, 1)
  await on.close()
  const off = manager(server.uri, 'gkm_shared_option', { sharedQuota: false })
  assert.ok((await off.initialize()).success)
  assert.equal(off.persistenceStats().peers, 0)
  await off.close()
  const bad = manager(server.uri, 'gkm_shared_option', { sharedQuota: 'yes' })
  const r = await bad.initialize()
  assert.equal(r.success, false)
  assert.match(r.error, /sharedQuota must be a boolean/)
})

test('with keys stored as fingerprints, URLs may name a key by its fingerprint', async () => {
  const server = await sharedServer()
  const m = manager(server.uri, 'gkm_fingerprint_urls')
  assert.ok((await m.initialize()).success)
  const http = await m.serve({ port: 0 })
  try {
    const r = await fetch(`${http.url}/api/keys/rate-limit/${fp(KEYS[1])}`)
    assert.equal(r.status, 200)
    const body = await r.json()
    assert.equal(body.success, true)
    assert.ok(!JSON.stringify(body).includes(KEYS[1]))
    const unknown = await fetch(`${http.url}/api/keys/rate-limit/${keyFingerprint('AIzaSyNOTCONFIGURED0000000000000000000', SECRET)}`)
    assert.equal(unknown.status, 404)
  } finally {
    await http.close()
    await m.close()
  }
})

test('a second attachStore is refused at once, even while the first is still connecting', async () => {
  const { NativeKeyPool } = require(path.join(PKG, 'binding.js'))
  const pool = new NativeKeyPool({ keys: KEYS, quiet: true })
  const uri = `mongodb://127.0.0.1:${await freePort()}/?directConnection=true`
  const first = pool.attachStore({ uri, connectTimeoutMs: 300, storePlaintextKeys: true })
  assert.throws(() => pool.attachStore({ uri, storePlaintextKeys: true }), /a store is already attached/)
  assert.equal((await first).connected, false)
  pool.close()
  await pool.closeStore()
})
