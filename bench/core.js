'use strict'

// `npm run bench`: the median time of one getBestAvailableKey + recordUsage pair, the addon against
// the plain-JS baseline of the old algorithm, in this process, at 10 and 1,000 keys, with limits
// high enough that no key runs out. Samples alternate between the two so machine noise hits both.

const { ApiKeyManagerService } = require('../lib')
const { BaselineKeyManager } = require('./baseline')

const PAIRS_PER_SAMPLE = 20_000
const SAMPLES = Number(process.env.BENCH_SAMPLES ?? 25)
const HIGH = { rpm: 1e15, rpd: 1e15, tpm: 1e15 }

function keysOf(n) {
  return Array.from({ length: n }, (_, i) => `AIzaSyBENCH${String(i).padStart(6, '0')}abcdefghijklmnopq`)
}

// One sampler per implementation, compiled separately: a single shared loop would see two classes
// at its call sites, and that polymorphism would slow down whichever runs in it, unlike in an app.
const SAMPLER = `return async function samplePair(manager) {
  const start = process.hrtime.bigint()
  for (let i = 0; i < ${PAIRS_PER_SAMPLE}; i++) {
    const r = await manager.getBestAvailableKey()
    if (!r.success) throw new Error(r.error)
    await manager.recordUsage(r.data[0], 120, true, undefined, 35)
  }
  return Number(process.hrtime.bigint() - start) / ${PAIRS_PER_SAMPLE}
}`
const newSampler = () => new Function(SAMPLER)()

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

async function run(n) {
  const keys = keysOf(n)
  const addon = new ApiKeyManagerService({ keys, limits: HIGH, quiet: true })
  await addon.initialize()
  const baseline = new BaselineKeyManager(keys, HIGH)
  const sampleAddon = newSampler()
  const sampleBaseline = newSampler()
  for (let i = 0; i < 3; i++) {
    await sampleAddon(addon)
    await sampleBaseline(baseline)
  }
  const a = []
  const b = []
  for (let i = 0; i < SAMPLES; i++) {
    a.push(await sampleAddon(addon))
    b.push(await sampleBaseline(baseline))
  }
  await addon.close()
  return { keys: n, addonNs: median(a), baselineNs: median(b) }
}

;(async () => {
  console.log(`getBestAvailableKey + recordUsage, median of ${SAMPLES} samples x ${PAIRS_PER_SAMPLE} pairs (node ${process.version})`)
  console.log('keys   | addon (ns/pair) | plain-JS baseline (ns/pair) | ratio addon/baseline')
  for (const n of [10, 1000]) {
    const r = await run(n)
    const ratio = r.addonNs / r.baselineNs
    console.log(
      `${String(n).padEnd(6)} | ${r.addonNs.toFixed(0).padStart(15)} | ${r.baselineNs.toFixed(0).padStart(27)} | ${ratio.toFixed(2)}`,
    )
  }
})().catch((e) => {
  console.error(e)
  process.exit(1)
})
