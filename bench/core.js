'use strict'

// `npm run bench`: in-process cost of the hot calls, this package against the old service's code
// path (bench/baseline.js), in this process, awaited as callers await them, with limits high enough
// that no key runs out:
//
//   pair     getBestAvailableKey + recordUsage of the key it handed out, at 10 and 1,000 keys
//   record   recordUsage alone, at 10 keys, naming the keys in turn
//   floor    two awaits of settled promises: what any awaited pair costs at the least
//
// and, to show where this package's pair spends its time, two white-box samples at 10 keys:
//
//   bodies   the two methods' synchronous bodies (`_best`, `_recordUsage`): the pair without its
//            promises and awaits
//   native   the two native calls those bodies make, their arguments written into the result
//            slots as lib/index.js writes them: the pair without its JS (`npm run bench:pool`
//            times the core behind them with no N-API at all)
//
// Every measurement is a sample of SAMPLE calls; a round takes one sample of each, in an order that
// rotates from round to round, so the machine's noise falls on all of them alike; figures are the
// medians over the rounds. Then memory: the RSS before and after 2 million pairs, and bytes per key.

const v8 = require('node:v8')
const vm = require('node:vm')
const { ApiKeyManagerService } = require('../lib')
const { BaselineKeyManager } = require('./baseline')
const { resultsLayout } = require('../binding.js')

const SLOTS = resultsLayout().slots
const [ARG0, ARG1, ARG2, ARG3] = ['arg0', 'arg1', 'arg2', 'arg3'].map((name) => SLOTS.indexOf(name))

v8.setFlagsFromString('--expose-gc')
const gc = vm.runInNewContext('gc')

const SAMPLE = 20_000
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 31)
const LONG_RUN = 2_000_000
const MEMORY_KEYS = 100_000
const HIGH = { rpm: 1e15, rpd: 1e15, tpm: 1e15 }

function keysOf(n) {
  return Array.from({ length: n }, (_, i) => `AIzaSyBENCH${String(i).padStart(6, '0')}abcdefghijklmnopq`)
}

// Each sampler is compiled once per subject: a loop shared by both implementations would see two
// classes at its call sites, and that polymorphism would slow down whichever runs in it.
const SAMPLERS = {
  pair: `return async function pair(m, keys, n) {
    const start = process.hrtime.bigint()
    for (let i = 0; i < n; i++) {
      const r = await m.getBestAvailableKey()
      if (!r.success) throw new Error(r.error)
      await m.recordUsage(r.data[0], 120, true, undefined, 35)
    }
    return Number(process.hrtime.bigint() - start) / n
  }`,
  record: `return async function record(m, keys, n) {
    let k = 0
    const start = process.hrtime.bigint()
    for (let i = 0; i < n; i++) {
      await m.recordUsage(keys[k], 120, true, undefined, 35)
      if (++k === keys.length) k = 0
    }
    return Number(process.hrtime.bigint() - start) / n
  }`,
  bodies: `return async function bodies(m, keys, n) {
    const start = process.hrtime.bigint()
    for (let i = 0; i < n; i++) {
      const r = m._best(0, undefined)
      if (!r.success) throw new Error(r.error)
      m._recordUsage(r.data[0], 120, true, undefined, 35)
    }
    return Number(process.hrtime.bigint() - start) / n
  }`,
  native: `return async function native(m, keys, n) {
    const s = m._results
    const hot = m._hot
    const start = process.hrtime.bigint()
    for (let i = 0; i < n; i++) {
      s[${ARG0}] = 0
      s[${ARG1}] = NaN
      const k = hot.best()
      s[${ARG0}] = k
      s[${ARG1}] = 120
      s[${ARG2}] = 35
      s[${ARG3}] = NaN
      hot.recordSuccess()
    }
    return Number(process.hrtime.bigint() - start) / n
  }`,
  floor: `return async function floor(p, keys, n) {
    const start = process.hrtime.bigint()
    for (let i = 0; i < n; i++) {
      const r = await p
      if (!r.success) throw new Error(r.error)
      await p
    }
    return Number(process.hrtime.bigint() - start) / n
  }`,
}
const compile = (kind) => new Function(SAMPLERS[kind])()

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

async function ours(keys) {
  const m = new ApiKeyManagerService({ keys, limits: HIGH, quiet: true })
  const init = await m.initialize()
  if (!init.success) throw new Error(init.error)
  return m
}

const mb = (bytes) => `${(bytes / 1048576).toFixed(1)} MB`

function memory() {
  gc()
  gc()
  return process.memoryUsage()
}

/** What N keys cost held in a pool: RSS and JS heap per key, for this package and the old path. */
async function bytesPerKey() {
  const keys = keysOf(MEMORY_KEYS)
  // Both held to the end, so neither reuses memory the other gave back.
  const before = memory()
  const old = new BaselineKeyManager(keys, HIGH)
  const withOld = memory()
  const m = await ours(keys)
  const withOurs = memory()
  const per = (a, b, field) => (b[field] - a[field]) / MEMORY_KEYS
  const result = {
    old: { rss: per(before, withOld, 'rss'), heap: per(before, withOld, 'heapUsed') },
    ours: { rss: per(withOld, withOurs, 'rss'), heap: per(withOld, withOurs, 'heapUsed') },
  }
  await m.close()
  old.manager.keys.length = 0
  return result
}

;(async () => {
  console.log(
    `node ${process.version}; medians of ${ROUNDS} interleaved rounds, ${SAMPLE.toLocaleString('en')} calls per sample; ns per call or pair`,
  )
  const subjects = []
  for (const n of [10, 1000]) {
    const keys = keysOf(n)
    subjects.push({ name: `pair ours ${n}`, kind: 'pair', m: await ours(keys), keys })
    subjects.push({ name: `pair old ${n}`, kind: 'pair', m: new BaselineKeyManager(keys, HIGH), keys })
  }
  const keys10 = keysOf(10)
  subjects.push({ name: 'record ours 10', kind: 'record', m: await ours(keys10), keys: keys10 })
  subjects.push({ name: 'record old 10', kind: 'record', m: new BaselineKeyManager(keys10, HIGH), keys: keys10 })
  subjects.push({ name: 'floor', kind: 'floor', m: Promise.resolve({ success: true }), keys: keys10 })
  subjects.push({ name: 'bodies', kind: 'bodies', m: await ours(keys10), keys: keys10 })
  subjects.push({ name: 'native', kind: 'native', m: await ours(keys10), keys: keys10 })
  for (const s of subjects) {
    s.sample = compile(s.kind)
    s.ns = []
  }
  for (let i = 0; i < 3; i++) for (const s of subjects) await s.sample(s.m, s.keys, SAMPLE)
  for (let round = 0; round < ROUNDS; round++) {
    for (let j = 0; j < subjects.length; j++) {
      const s = subjects[(round + j) % subjects.length]
      s.ns.push(await s.sample(s.m, s.keys, SAMPLE))
    }
  }
  const at = Object.fromEntries(subjects.map((s) => [s.name, median(s.ns)]))
  const row = (what, a, b) =>
    console.log(`${what.padEnd(34)} | ${a.toFixed(0).padStart(9)} | ${b.toFixed(0).padStart(9)} | ${(a / b).toFixed(2).padStart(5)}`)
  console.log(`${'call'.padEnd(34)} | ${'this (ns)'.padStart(9)} | ${'old (ns)'.padStart(9)} | ratio`)
  row('pair at 10 keys', at['pair ours 10'], at['pair old 10'])
  row('pair at 1,000 keys', at['pair ours 1000'], at['pair old 1000'])
  row('recordUsage alone at 10 keys', at['record ours 10'], at['record old 10'])
  console.log(`floor, two awaits of settled promises: ${at.floor.toFixed(0)} ns`)
  console.log(`this package, pair at 1,000 keys / pair at 10 keys: ${(at['pair ours 1000'] / at['pair ours 10']).toFixed(2)}`)
  console.log(
    `this package's pair at 10 keys without its awaits: ${at.bodies.toFixed(0)} ns; its two native calls alone: ${at.native.toFixed(0)} ns`,
  )
  for (const s of subjects) if (s.m instanceof ApiKeyManagerService) await s.m.close()

  const m = await ours(keysOf(10))
  const sample = compile('pair')
  await sample(m, null, 200_000)
  const before = memory()
  await sample(m, null, LONG_RUN)
  const after = memory()
  await m.close()
  console.log(
    `RSS before and after ${LONG_RUN.toLocaleString('en')} pairs (10 keys): ${mb(before.rss)} -> ${mb(after.rss)} ` +
      `(JS heap ${mb(before.heapUsed)} -> ${mb(after.heapUsed)})`,
  )

  const per = await bytesPerKey()
  console.log(
    `bytes per key (${MEMORY_KEYS.toLocaleString('en')} keys): this package ${per.ours.rss.toFixed(0)} RSS (${per.ours.heap.toFixed(0)} of it JS heap), ` +
      `old ${per.old.rss.toFixed(0)} RSS (${per.old.heap.toFixed(0)} JS heap)`,
  )
})().catch((e) => {
  console.error(e)
  process.exit(1)
})
