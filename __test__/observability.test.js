'use strict'

// Issue 6, points 1, 2 and 5 (without MongoDB; mongo.test.js covers the database side): usage
// statistics from the in-memory call log, metrics as an object and in the Prometheus text format,
// and key fingerprints.

const test = require('node:test')
const assert = require('node:assert/strict')
const crypto = require('node:crypto')

const { PKG, fakeKey, mask, usageJson } = require('./helpers')
const { ApiKeyManagerService, keyFingerprint } = require(PKG)

const LIMITS = { rpm: 30, rpd: 200, tpm: 1000000 }

function manager(n, extra = {}) {
  const keys = Array.from({ length: n }, (_, i) => fakeKey(200 + i))
  return { m: new ApiKeyManagerService({ keys, limits: LIMITS, quiet: true, ...extra }), keys }
}

test('getUsageStats computes per-key and total figures from the recorded calls', async (t) => {
  const { m, keys } = manager(3)
  t.after(() => m.close())
  await m.recordUsage(keys[0], 100, true, undefined, 10)
  await m.recordUsage(keys[0], 50, true, undefined, 30)
  await m.recordUsage(keys[0], 0, false, new Error('503 Service Unavailable'), 20)
  await m.recordUsage(keys[1], 7, true, undefined, 5)
  const r = await m.getUsageStats()
  assert.ok(r.success, r.error)
  assert.equal(r.data.length, 3)
  const [a, b, c] = r.data
  assert.equal(a.apiKey, mask(keys[0]))
  assert.ok(a.lastUsed instanceof Date)
  // The SPEC's fields stay.
  for (const f of ['isActive', 'rpmUsage', 'rpdUsage', 'tpmUsage', 'errorCount', 'lastError']) assert.ok(f in a, f)
  assert.deepEqual(
    [a.requests, a.successes, a.failures, a.tokens, a.p50ResponseTime, a.p95ResponseTime],
    [3, 2, 1, 150, 20, 30],
  )
  assert.equal(a.errorRate, 1 / 3)
  assert.deepEqual([b.requests, b.errorRate, b.p50ResponseTime], [1, 0, 5])
  assert.deepEqual([c.requests, c.p50ResponseTime, c.p95ResponseTime], [0, null, null])
  assert.deepEqual(r.metadata.totals, {
    requests: 4,
    successes: 3,
    failures: 1,
    errorRate: 0.25,
    tokens: 157,
    p50ResponseTime: 10,
    p95ResponseTime: 30,
  })
  assert.equal(r.metadata.source, 'memory')
  assert.equal(r.metadata.callLogCapacity, 10000)
  assert.equal(r.metadata.truncated, false)
  assert.equal(r.metadata.startDate, null)

  // A range in the future has no calls; the date forms all work.
  const later = Date.now() + 60000
  for (const startDate of [new Date(later), later, new Date(later).toISOString()]) {
    const f = await m.getUsageStats({ startDate })
    assert.ok(f.success, f.error)
    assert.equal(f.metadata.totals.requests, 0)
    assert.equal(f.metadata.startDate.getTime(), later)
  }
  const past = await m.getUsageStats({ endDate: new Date(Date.now() - 60000) })
  assert.equal(past.metadata.totals.requests, 0)
})

test('getUsageStats refuses bad dates with a clear error', async (t) => {
  const { m } = manager(1)
  t.after(() => m.close())
  const cases = [
    [{ startDate: 'yesterday' }, /^Invalid startDate: startDate must be an ISO-8601 date/],
    [{ endDate: new Date(NaN) }, /^Invalid endDate/],
    [{ startDate: {} }, /^Invalid startDate/],
    [{ startDate: '2026-02-01', endDate: '2026-01-01' }, /^Invalid date range: startDate must not be after endDate/],
  ]
  for (const [range, error] of cases) {
    const r = await m.getUsageStats(range)
    assert.equal(r.success, false, JSON.stringify(range))
    assert.match(r.error, error)
  }
})

test('the in-memory call log is bounded by usageLogCapacity and says when it lost calls', async (t) => {
  const { m, keys } = manager(1, { usageLogCapacity: 3 })
  t.after(() => m.close())
  for (let i = 0; i < 5; i++) await m.recordUsage(keys[0], 1, true, undefined, i)
  const r = await m.getUsageStats()
  assert.equal(r.data[0].requests, 3)
  assert.equal(r.metadata.truncated, true)
  assert.equal(r.metadata.callLogCapacity, 3)
  const bad = new ApiKeyManagerService({ keys, quiet: true, usageLogCapacity: -1 })
  assert.match((await bad.getUsageStats()).error, /usageLogCapacity must be a non-negative integer/)
})

test('GET /api/keys/usage-stats serves the same figures, and 400s for bad dates', async (t) => {
  const { m, keys } = manager(2)
  const server = await m.serve({ port: 0 })
  t.after(async () => {
    await server.close()
    await m.close()
  })
  await m.recordUsage(keys[1], 9, true, undefined, 42)
  const res = await fetch(`${server.url}/api/keys/usage-stats`)
  const body = await res.json()
  assert.equal(res.status, 200)
  assert.equal(body.data[1].requests, 1)
  assert.equal(body.data[1].p95ResponseTime, 42)
  assert.deepEqual(withoutDates(body), withoutDates({ ...(await m.getUsageStats()), message: body.message }))
  for (const q of ['startDate=nope', 'endDate=2026-13-01', 'startDate=2026-02-01&endDate=2026-01-01']) {
    const bad = await fetch(`${server.url}/api/keys/usage-stats?${q}`)
    assert.equal(bad.status, 400, q)
    const error = await bad.json()
    assert.equal(error.success, false)
    assert.match(error.error, /^Invalid (startDate|endDate|date range)$/)
    assert.equal(typeof error.message, 'string')
  }
})

/** A value with its Dates and ISO strings replaced, to compare answers taken at different instants. */
test('getUsageStats is the route\'s answer as objects: the same JSON for the same range, instants as Dates', async (t) => {
  const { m, keys } = manager(3)
  const server = await m.serve({ port: 0 })
  t.after(async () => {
    await server.close()
    await m.close()
  })
  await m.recordUsage(keys[0], 120, true, undefined, 30)
  await m.recordUsage(keys[1], 0, false, { message: 'Service Unavailable', status: 503 }, 80)
  await m.handleRateLimit(keys[2], 'RPM')
  await m.removeKey(keys[0])
  const range = { startDate: new Date(Date.now() - 60000), endDate: new Date(Date.now() + 60000) }
  const query = `startDate=${range.startDate.toISOString()}&endDate=${range.endDate.getTime()}`
  const body = await (await fetch(`${server.url}/api/keys/usage-stats?${query}`)).json()
  const native = await m.getUsageStats({ startDate: range.startDate, endDate: range.endDate.getTime() })
  assert.deepEqual(usageJson({ ...native, message: body.message }), usageJson(body))
  assert.equal(native.data[0].removed, true)
  assert.ok(native.metadata.startDate instanceof Date && native.metadata.endDate instanceof Date)
  assert.equal(native.metadata.callLogCapacity, 10000)
  for (const key of native.data) {
    assert.ok(key.lastUsed instanceof Date)
    for (const budget of Object.values(key.models)) {
      assert.ok(budget.stateUntil === null || budget.stateUntil instanceof Date)
      for (const w of [budget.rpm, budget.rpd, budget.tpm]) assert.ok(w.resetTime instanceof Date)
    }
  }
  const resting = Object.values(native.data.at(-1).models)[0]
  assert.ok(resting.stateUntil instanceof Date, 'the rate-limited budget rests until a Date')
})

function withoutDates(v) {
  return JSON.parse(JSON.stringify(v), (k, x) => (typeof x === 'string' && /^\d{4}-\d\d-\d\dT/.test(x) ? '<date>' : x))
}

test('getMetrics counts hand-outs, cache hits, rotations, 429s and keys by state', async (t) => {
  const { m, keys } = manager(3, { limits: { rpm: 10, rpd: 100, tpm: 1000 } })
  t.after(() => m.close())
  for (let i = 0; i < 4; i++) {
    const r = await m.getBestAvailableKey()
    await m.recordUsage(r.data[0], 10, true, undefined, 5)
  }
  await m.handleRateLimit(keys[2], 'TPM')
  await m.recordUsage(keys[1], 0, false, { message: 'Too Many Requests', status: 429 })
  const x = m.getMetrics()
  assert.equal(x.handedOut, 4)
  assert.equal(x.selections.cacheHits + x.selections.cacheMisses, 4)
  assert.ok(x.selections.cacheMisses >= 1)
  assert.equal(x.selections.cacheHitRate, x.selections.cacheHits / 4)
  assert.deepEqual(x.rateLimits, { total: 2, rpm: 1, rpd: 0, tpm: 1 })
  assert.equal(x.rotations.onError, 2)
  assert.deepEqual(x.calls, { successes: 4, failures: 1, tokens: 40 })
  assert.deepEqual(x.keysByState, {
    active: 1,
    resting: 2,
    'circuit-open': 0,
    'half-open': 0,
    deactivated: 0,
    'no-quota': 0,
    disabled: 0,
  })
  assert.deepEqual(
    x.keys.map((k) => k.apiKey),
    keys.map(mask),
  )
  const k0 = x.keys[0]
  assert.equal(k0.state, 'active')
  assert.deepEqual(k0.rpm.limit, 10)
  assert.ok(k0.rpm.current >= 1 && k0.availabilityScore < 1)
})

test('getMetrics counts a proactive rotation', async (t) => {
  const { m, keys } = manager(2, { limits: { rpm: 10, rpd: 10, tpm: 1000 } })
  t.after(() => m.close())
  // Key 0 nearly used up: its score falls under 0.3.
  for (let i = 0; i < 9; i++) await m.recordUsage(keys[0], 0, true)
  const p = await m.getNextKeyForRotation()
  assert.equal(p.metadata.rotationReason, 'proactive-rotation')
  assert.equal(m.getMetrics().rotations.proactive, 1)
  assert.equal(m.getMetrics().handedOut, 1)
})

test('GET /metrics is the Prometheus text format, with masked keys, and changes with traffic', async (t) => {
  const { m, keys } = manager(2)
  const server = await m.serve({ port: 0 })
  t.after(async () => {
    await server.close()
    await m.close()
  })
  const scrape = async () => {
    const res = await fetch(`${server.url}/metrics`)
    assert.equal(res.status, 200)
    assert.equal(res.headers.get('content-type'), 'text/plain; version=0.0.4; charset=utf-8')
    return res.text()
  }
  const before = await scrape()
  const r = await m.getBestAvailableKey()
  await m.recordUsage(r.data[0], 123, true, undefined, 9)
  const text = await scrape()
  assert.notEqual(text, before)
  for (const k of keys) assert.ok(!text.includes(k), 'a full key in /metrics')
  assert.equal(text, m.getMetricsText())
  const lines = text.trimEnd().split('\n')
  const types = new Map()
  for (const line of lines) {
    const type = line.match(/^# TYPE (\S+) (counter|gauge)$/)
    if (type) {
      types.set(type[1], type[2])
      continue
    }
    if (line.startsWith('# HELP ')) continue
    const sample = line.match(/^([a-z_]+)(\{[^}]*\})? (\S+)$/)
    assert.ok(sample, `not a sample line: ${line}`)
    assert.ok(types.has(sample[1]), `no # TYPE for ${sample[1]}`)
    assert.ok(!Number.isNaN(Number(sample[3])), line)
  }
  for (const [name, type] of types) {
    assert.equal(type === 'counter', name.endsWith('_total'), name)
    assert.ok(lines.includes(`# TYPE ${name} ${type}`) && lines.some((l) => l.startsWith(`# HELP ${name} `)), name)
  }
  assert.ok(lines.includes('gemini_key_manager_keys_handed_out_total 1'), text)
  assert.ok(lines.includes('gemini_key_manager_tokens_total 123'), text)
  assert.ok(lines.includes('gemini_key_manager_keys{state="active"} 2'), text)
  assert.ok(lines.includes(`gemini_key_manager_key_window_limit{key="${mask(keys[1])}",index="1",window="rpd"} 200`), text)
  assert.equal((await fetch(`${server.url}/metrics`, { method: 'POST' })).status, 405)
})

test('keyFingerprint is HMAC-SHA256 under the secret, cut to 128 bits, or without one the SHA-256 digest', () => {
  const key = fakeKey(1)
  const secret = 'a secret of at least 16 bytes'
  const expected = 'fp_' + crypto.createHmac('sha256', secret).update(key).digest('hex').slice(0, 32)
  assert.equal(keyFingerprint(key, secret), expected)
  assert.notEqual(keyFingerprint(key, secret + '!'), expected)
  assert.throws(() => keyFingerprint(key, 'short'), /at least 16 bytes/)
  const saved = process.env.KEY_MANAGER_FINGERPRINT_SECRET
  try {
    delete process.env.KEY_MANAGER_FINGERPRINT_SECRET
    assert.equal(keyFingerprint(key), 'sha256_' + crypto.createHash('sha256').update(key).digest('hex').slice(0, 32))
    process.env.KEY_MANAGER_FINGERPRINT_SECRET = secret
    assert.equal(keyFingerprint(key), expected)
  } finally {
    if (saved === undefined) delete process.env.KEY_MANAGER_FINGERPRINT_SECRET
    else process.env.KEY_MANAGER_FINGERPRINT_SECRET = saved
  }
})

test('getMetrics and getUsageStats on a closed manager', async () => {
  const { m } = manager(1)
  await m.close()
  assert.throws(() => m.getMetrics(), /closed/)
  assert.equal((await m.getUsageStats()).error, 'API key manager is closed')
})
