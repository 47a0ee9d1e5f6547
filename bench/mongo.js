'use strict'

// `npm run bench:mongo`: selections per second and MongoDB round trips per selection, with
// persistence off, on (write-behind), and on with the quota shared across processes (leases),
// against the plain-JS baseline doing what the old service did: an unawaited updateOne on every
// selection. All against one nx-27017 server (shared/MONGO.md) this script starts, in one process;
// samples alternate between the four so machine noise hits each alike.
//
// A selection here is one getBestAvailableKey + recordUsage pair, limits too high to run out.
// Round trips per selection are counted at the end of each sample, after a close that flushes
// everything (so write-behind's last batch is in), or after every baseline write has completed.

const fs = require('node:fs')
const net = require('node:net')
const os = require('node:os')
const path = require('node:path')
const { spawn, spawnSync } = require('node:child_process')
const { MongoClient } = require('mongodb')
const { ApiKeyManagerService } = require('../lib')
const { BaselineKeyManager } = require('./baseline')
const { freePort } = require('../__test__/helpers')

const ROOT = path.join(__dirname, '..')
const NX = path.join(ROOT, '.venv-mongo', 'bin', 'nx-27017')
const KEYS = Array.from({ length: 10 }, (_, i) => `AIzaSyBENCH${String(i).padStart(6, '0')}abcdefghijklmnopq`)
const HIGH = { rpm: 1e12, rpd: 1e12, tpm: 1e15 }
const SELECTIONS = Number(process.env.BENCH_SELECTIONS ?? 20_000)
const SAMPLES = Number(process.env.BENCH_SAMPLES ?? 5)
const PACED_RATE = 50
// Keys are stored as fingerprints, as in production.
const SECRET = 'bench fingerprint secret, 32 bytes'
const PACED_MS = 20_000
// Paced runs count only after this: the first leases and the first write are start-up, not steady state.
const PACED_WARMUP_MS = 5_000

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

async function startServer() {
  if (!fs.existsSync(NX)) spawnSync('bash', [path.join(ROOT, 'scripts', 'mongo-test-server.sh')], { stdio: 'inherit' })
  const port = await freePort()
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gkm-bench-mongo-'))
  const args = ['--db', 'memory', '--host', '127.0.0.1', '-p', String(port), '--pid-file', path.join(dir, 'nx.pid'), '--log-file', path.join(dir, 'nx.log')]
  const child = spawn(NX, args, { stdio: 'ignore' })
  const uri = `mongodb://127.0.0.1:${port}/?directConnection=true`
  for (let i = 0; i < 200; i++) {
    const up = await new Promise((resolve) => {
      const s = net.connect({ port, host: '127.0.0.1' }, () => {
        s.destroy()
        resolve(true)
      })
      s.once('error', () => resolve(false))
    })
    if (up) break
    await sleep(100)
  }
  return {
    uri,
    stop() {
      child.kill('SIGKILL')
      fs.rmSync(dir, { recursive: true, force: true })
    },
  }
}

/** The old service's write pattern: every selection fires an updateOne of the key's document and does not wait for it. */
class MongoBaseline extends BaselineKeyManager {
  constructor(keys, limits, collection) {
    super(keys, limits)
    this.collection = collection
    this.ops = 0
    this.inFlight = new Set()
  }

  async getBestAvailableKey() {
    const r = await super.getBestAvailableKey()
    if (r.success) {
      const [apiKey, status] = r.data
      this.ops++
      const write = this.collection
        .updateOne({ apiKey }, { $set: { lastUsed: status.lastUsed, limits: status.limits } }, { upsert: true })
        .catch(() => {})
        .finally(() => this.inFlight.delete(write))
      this.inFlight.add(write)
    }
    return r
  }

  async drain() {
    while (this.inFlight.size > 0) await Promise.all([...this.inFlight])
  }
}

const SAMPLER = `return async function sample(manager, n) {
  const start = process.hrtime.bigint()
  for (let i = 0; i < n; i++) {
    const r = await manager.getBestAvailableKey()
    if (!r.success) throw new Error(r.error)
    await manager.recordUsage(r.data[0], 120, true, undefined, 35)
  }
  return Number(process.hrtime.bigint() - start) / 1e9
}`
const newSampler = () => new Function(SAMPLER)()

let dbCounter = 0
function ours(uri, extra) {
  return new ApiKeyManagerService({
    keys: KEYS,
    limits: HIGH,
    quiet: true,
    ...(uri ? { mongodbUri: uri, mongodbDbName: `bench_${dbCounter++}`, fingerprintSecret: SECRET, ...extra } : {}),
  })
}

/** One sample of `make()`'s manager: selections per second, and round trips per selection. */
async function measure(make, sample, n, expectMongo) {
  const m = make()
  if (m instanceof ApiKeyManagerService) {
    const init = await m.initialize()
    if (!init.success) throw new Error(init.error)
    if (expectMongo && init.metadata.mode === 'in-memory') throw new Error('MongoDB was not reached')
  }
  const seconds = await sample(m, n)
  let ops = 0
  let dropped = 0
  if (m instanceof MongoBaseline) {
    await m.drain()
    ops = m.ops
  } else {
    await m.close()
    // close() flushed and ended the writer: its figures are final.
    const stats = m.persistenceStats()
    if (stats !== null) {
      ops = stats.ops
      dropped = stats.dropped
    }
  }
  return { rate: n / seconds, opsPerSelection: ops / n, dropped }
}

/** Round trips per selection for our write-behind at a steady, low rate (where batching helps least), after a warm-up. */
async function paced(uri, extra) {
  const m = ours(uri, extra)
  const init = await m.initialize()
  if (init.metadata.mode === 'in-memory') throw new Error('MongoDB was not reached')
  const select = async () => {
    const r = await m.getBestAvailableKey()
    if (!r.success) throw new Error(r.error)
    await m.recordUsage(r.data[0], 120, true, undefined, 35)
    await sleep(1000 / PACED_RATE)
  }
  const warm = Date.now() + PACED_WARMUP_MS
  while (Date.now() < warm) await select()
  const start = m.persistenceStats().ops
  let n = 0
  const end = Date.now() + PACED_MS
  while (Date.now() < end) {
    await select()
    n++
  }
  // Counted before close: close's own writes are not steady state either.
  const ops = m.persistenceStats().ops - start
  await m.close()
  return { n, opsPerSelection: ops / n }
}

;(async () => {
  const server = await startServer()
  const client = new MongoClient(server.uri)
  await client.connect()
  const collection = client.db('bench_baseline').collection('api_keys')
  const variants = [
    ['addon, persistence off', () => ours(null), false],
    ['addon, MongoDB write-behind', () => ours(server.uri, { sharedQuota: false }), true],
    ['addon, write-behind + shared quota', () => ours(server.uri, { sharedQuota: true }), true],
    ['plain-JS baseline, updateOne per selection', () => new MongoBaseline(KEYS, HIGH, collection), false],
  ]
  const samplers = variants.map(() => newSampler())
  const results = variants.map(() => [])
  // Warm-up, then samples alternating between the variants.
  for (let v = 0; v < variants.length; v++) await measure(variants[v][1], samplers[v], 2_000, variants[v][2])
  for (let s = 0; s < SAMPLES; s++) {
    for (let v = 0; v < variants.length; v++) results[v].push(await measure(variants[v][1], samplers[v], SELECTIONS, variants[v][2]))
  }
  console.log(`MongoDB (nx-27017) bench, ${KEYS.length} keys, median of ${SAMPLES} samples x ${SELECTIONS} selections (node ${process.version})`)
  console.log('variant                                      | selections/s | DB ops/selection | usage docs dropped')
  const baseRate = median(results[3].map((r) => r.rate))
  for (let v = 0; v < variants.length; v++) {
    const rate = median(results[v].map((r) => r.rate))
    const ops = median(results[v].map((r) => r.opsPerSelection))
    const dropped = median(results[v].map((r) => r.dropped))
    console.log(
      `${variants[v][0].padEnd(44)} | ${rate.toFixed(0).padStart(12)} | ${ops.toFixed(4).padStart(16)} | ${String(dropped).padStart(18)}   (${(rate / baseRate).toFixed(1)}x baseline)`,
    )
  }
  for (const [name, extra] of [['write-behind', { sharedQuota: false }], ['write-behind + shared quota', { sharedQuota: true }]]) {
    const p = await paced(server.uri, extra)
    console.log(`paced at ${PACED_RATE}/s for ${PACED_MS / 1000} s after ${PACED_WARMUP_MS / 1000} s of warm-up, ${name}: ${p.opsPerSelection.toFixed(4)} DB ops/selection (${p.n} selections)`)
  }
  await client.close()
  server.stop()
})().catch((e) => {
  console.error(e)
  process.exit(1)
})
