'use strict'

// The HTTP API (SPEC sections 4 and 5) over real sockets: the Rust server started in-process with
// `manager.serve()`, the CLI in a child process (with the operators' test-fast-rotation.js run
// against it unchanged), and the Express adapter `keyRoutes()` compared with the Rust server.

const { describe, test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const net = require('node:net')
const path = require('node:path')
const { spawn } = require('node:child_process')

const express = require('express')

const { PKG, FIXTURES, fakeKey, mask, cleanEnv } = require('./helpers')
const { ApiKeyManagerService, keyRoutes } = require(PKG)

const CLI = path.join(PKG, 'bin', 'gemini-key-manager.js')
const LIMITS = { rpm: 30, rpd: 200, tpm: 1000000 }
const ISO = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/
const MASKED = /^.{8}\.\.\..{4}$/
const INVALID_KEY_ERROR = '[400 Bad Request] API key not valid. Please pass a valid API key. API_KEY_INVALID'

/** Every full key any server in this file was given: none may ever appear in a response body. */
const ALL_KEYS = new Set()
let nextKey = 1

function newKeys(n) {
  const keys = Array.from({ length: n }, () => fakeKey(nextKey++))
  for (const k of keys) ALL_KEYS.add(k)
  return keys
}

function assertNoFullKey(text, where) {
  for (const k of ALL_KEYS) {
    assert.ok(!text.includes(k), `${where}: a full key appears in the response body:\n${text}`)
  }
}

/** A quiet manager over `n` fresh keys, served by the Rust server on an ephemeral port. */
async function startServer(t, n = 3, limits = LIMITS) {
  const keys = newKeys(n)
  const m = new ApiKeyManagerService({ keys, limits, quiet: true })
  const server = await m.serve({ host: '127.0.0.1', port: 0 })
  const cleanup = async () => {
    await server.close()
    await m.close()
  }
  if (t) t.after(cleanup)
  return { m, keys, server, base: `${server.url}/api/keys`, cleanup }
}

/** One request: checks the reply is JSON and names no full key, and returns its status and body. */
async function call(base, method, urlPath, { body, headers } = {}) {
  const res = await fetch(base + urlPath, { method, body, headers })
  const text = await res.text()
  assertNoFullKey(text, `${method} ${urlPath}`)
  assert.match(res.headers.get('content-type') ?? '', /^application\/json/, `${method} ${urlPath}: ${text}`)
  let json
  try {
    json = JSON.parse(text)
  } catch {
    assert.fail(`${method} ${urlPath}: body is not JSON: ${text}`)
  }
  return { status: res.status, headers: res.headers, body: json, text }
}

const get = (base, p, opts) => call(base, 'GET', p, opts)
const post = (base, p, opts) => call(base, 'POST', p, opts)

function fieldsOf(obj) {
  return Object.keys(obj).sort()
}

/** `obj` has every field the SPEC names (the project may add more: SPEC, first paragraph). */
function assertHasFields(obj, fields, where = '') {
  assert.equal(typeof obj, 'object', where)
  assert.ok(obj !== null, where)
  for (const f of fields) assert.ok(f in obj, `${where}: field ${f} missing from ${JSON.stringify(obj)}`)
}

/** A JSON body with every ISO date replaced, for comparing answers given at different instants. */
function withoutDates(v) {
  return JSON.parse(JSON.stringify(v), (k, x) => (typeof x === 'string' && ISO.test(x) ? '<date>' : x))
}

/** The SPEC's error shape: `{ success: false, error, message }`. */
function assertError(r, status, error) {
  assert.equal(r.status, status, r.text)
  // A 429 also says when a key frees.
  const fields = status === 429 ? ['error', 'message', 'nextAvailableAt', 'success'] : ['error', 'message', 'success']
  assert.deepEqual(fieldsOf(r.body), fields, r.text)
  assert.equal(r.body.success, false)
  assert.equal(typeof r.body.error, 'string')
  assert.equal(typeof r.body.message, 'string')
  if (error !== undefined) assert.equal(r.body.error, error, r.text)
}

function assertWindow(w, limit) {
  assert.deepEqual(fieldsOf(w), ['current', 'limit', 'resetTime'])
  assert.equal(typeof w.current, 'number')
  assert.equal(w.limit, limit)
  assert.match(w.resetTime, ISO)
}

function assertLimits(limits, expected = LIMITS) {
  assert.deepEqual(fieldsOf(limits), ['rpd', 'rpm', 'tpm'])
  assertWindow(limits.rpm, expected.rpm)
  assertWindow(limits.rpd, expected.rpd)
  assertWindow(limits.tpm, expected.tpm)
}

/** The key's entry in GET /status, found by its masked form. */
async function statusEntry(base, key) {
  const r = await get(base, '/status')
  assert.equal(r.status, 200, r.text)
  const entry = r.body.data.find((s) => s.apiKey === mask(key))
  assert.ok(entry, `no /status entry for ${mask(key)}: ${r.text}`)
  return entry
}

// ------------------------------------------------------------------------------------------------
// 1. The Rust server, endpoint by endpoint (SPEC section 4).
// ------------------------------------------------------------------------------------------------

describe('Rust HTTP server: the SPEC section 4 endpoints', () => {
  let srv
  before(async () => {
    srv = await startServer(null, 3)
  })
  after(async () => {
    await srv.cleanup()
  })

  test('GET /status lists every key, masked, with metadata and a message', async () => {
    const r = await get(srv.base, '/status')
    assert.equal(r.status, 200, r.text)
    assert.deepEqual(fieldsOf(r.body), ['data', 'message', 'metadata', 'success'])
    assert.equal(r.body.success, true)
    assert.equal(typeof r.body.message, 'string')
    assert.deepEqual(r.body.metadata, { totalKeys: 3, activeKeys: 3 })
    assert.equal(r.body.data.length, 3)
    assert.deepEqual(
      r.body.data.map((s) => s.apiKey),
      srv.keys.map(mask),
    )
    for (const s of r.body.data) {
      assert.match(s.apiKey, MASKED)
      assert.equal(s.isActive, true)
      assert.match(s.lastUsed, ISO)
      assert.equal(typeof s.errorCount, 'number')
      assertLimits(s.limits)
      assertHasFields(s, ['apiKey', 'isActive', 'lastUsed', 'limits', 'errorCount'], 'ApiKeyStatus')
    }
  })

  test('GET /best returns a masked key with score, method, lastUsed and limits', async () => {
    const masks = srv.keys.map(mask)
    for (let i = 0; i < 4; i++) {
      const r = await get(srv.base, '/best')
      assert.equal(r.status, 200, r.text)
      assert.deepEqual(fieldsOf(r.body), ['data', 'message', 'metadata', 'success'])
      assert.equal(r.body.success, true)
      assert.equal(typeof r.body.message, 'string')
      const d = r.body.data
      assertHasFields(
        d,
        ['apiKey', 'availabilityScore', 'totalAvailable', 'rotationMethod', 'lastUsed', 'limits'],
        'GET /best data',
      )
      assert.ok(masks.includes(d.apiKey), `${d.apiKey} is not one of ${masks}`)
      assert.equal(typeof d.availabilityScore, 'number')
      assert.ok(d.availabilityScore >= 0 && d.availabilityScore <= 1)
      assert.equal(d.totalAvailable, 3)
      assert.ok(['round-robin', 'cached-round-robin'].includes(d.rotationMethod), d.rotationMethod)
      assert.match(d.lastUsed, ISO)
      assertLimits(d.limits)
      assert.equal(typeof r.body.metadata, 'object')
      assert.equal(r.body.metadata.rotationMethod, d.rotationMethod)
      assert.equal(r.body.metadata.availabilityScore, d.availabilityScore)
    }
  })

  test('POST /rotate answers with a string rotationReason and the proactive message', async () => {
    const r = await post(srv.base, '/rotate')
    assert.equal(r.status, 200, r.text)
    assert.deepEqual(fieldsOf(r.body), ['data', 'message', 'metadata', 'success'])
    assert.equal(r.body.success, true)
    assert.equal(r.body.message, 'API key rotated proactively')
    const d = r.body.data
    assertHasFields(
      d,
      ['apiKey', 'availabilityScore', 'rotationReason', 'previousKeyScore', 'lastUsed', 'limits'],
      'POST /rotate data',
    )
    assert.ok(srv.keys.map(mask).includes(d.apiKey))
    assert.equal(typeof d.rotationReason, 'string')
    assert.ok(d.rotationReason.length > 0)
    assert.notEqual(d.rotationReason, 'proactive-rotation', 'no key is near its limits yet')
    assert.equal(typeof d.availabilityScore, 'number')
    assert.ok(d.previousKeyScore === null || typeof d.previousKeyScore === 'number')
    assert.match(d.lastUsed, ISO)
    assertLimits(d.limits)
  })

  test('POST /refresh-cache', async () => {
    const r = await post(srv.base, '/refresh-cache')
    assert.equal(r.status, 200, r.text)
    assert.deepEqual(r.body, {
      success: true,
      message: 'API key cache refreshed successfully',
      metadata: { cacheRefreshed: true, availableKeys: 3 },
    })
  })

  test('GET /rate-limit/:apiKey takes the full key or its masked form; an unknown key is a 404', async () => {
    const key = srv.keys[1]
    const rec = await srv.m.recordUsage(key, 42, true)
    assert.equal(rec.success, true)
    const expectedRpm = (await srv.m.getRateLimitInfo(key)).data[0].current
    assert.ok(expectedRpm >= 1)
    for (const form of [key, mask(key), encodeURIComponent(mask(key))]) {
      const r = await get(srv.base, `/rate-limit/${form}`)
      assert.equal(r.status, 200, `${form}: ${r.text}`)
      assert.deepEqual(fieldsOf(r.body), ['data', 'message', 'success'])
      assert.equal(r.body.success, true)
      assert.equal(typeof r.body.message, 'string')
      assert.deepEqual(
        r.body.data.map((i) => i.type),
        ['RPM', 'RPD', 'TPM'],
      )
      for (const info of r.body.data) {
        assertHasFields(info, ['type', 'current', 'limit', 'resetTime', 'isLimited'], 'RateLimitInfo')
        assert.equal(info.isLimited, false)
        assert.match(info.resetTime, ISO)
      }
      assert.deepEqual(
        r.body.data.map((i) => i.limit),
        [LIMITS.rpm, LIMITS.rpd, LIMITS.tpm],
      )
      assert.equal(r.body.data[0].current, expectedRpm)
      assert.ok(r.body.data[2].current >= 42)
    }
    for (const unknown of [fakeKey(999), 'AIzaSyZZ...9999', 'nope']) {
      const r = await get(srv.base, `/rate-limit/${unknown}`)
      assertError(r, 404, 'API key not found')
    }
  })

  test('GET /rate-limit/ without a key is a 400', async () => {
    assertError(await get(srv.base, '/rate-limit/'), 400)
    assertError(await get(srv.base, '/rate-limit'), 400)
  })

  test('POST /reactivate/:apiKey brings back a key deactivated by errors (full or masked key)', async () => {
    for (const form of [(k) => k, mask]) {
      const key = srv.keys[2]
      // Five failures in a row deactivated a key in the old service; an invalid-key refusal is the
      // failure that should deactivate it for good in any version.
      for (let i = 0; i < 5; i++) await srv.m.recordUsage(key, 0, false, INVALID_KEY_ERROR)
      assert.equal((await statusEntry(srv.base, key)).isActive, false)
      const r = await post(srv.base, `/reactivate/${form(key)}`)
      assert.equal(r.status, 200, r.text)
      assert.deepEqual(r.body, { success: true, message: 'API key reactivated successfully' })
      const entry = await statusEntry(srv.base, key)
      assert.equal(entry.isActive, true)
      assert.equal(entry.errorCount, 0)
    }
    assertError(await post(srv.base, `/reactivate/${fakeKey(998)}`), 404, 'API key not found')
  })

  test('POST /reset-limits clears every window', async () => {
    for (const key of srv.keys) await srv.m.recordUsage(key, 100, true)
    await srv.m.handleRateLimit(srv.keys[0], 'RPM')
    const r = await post(srv.base, '/reset-limits')
    assert.equal(r.status, 200, r.text)
    assert.deepEqual(r.body, { success: true, message: 'All API key limits reset successfully' })
    for (const key of srv.keys) {
      const info = await get(srv.base, `/rate-limit/${mask(key)}`)
      assert.deepEqual(
        info.body.data.map((i) => i.current),
        [0, 0, 0],
      )
    }
  })

  test('GET /usage-stats, with and without a date range', async () => {
    await srv.m.recordUsage(srv.keys[0], 7, true)
    const plain = await get(srv.base, '/usage-stats')
    assert.equal(plain.status, 200, plain.text)
    assert.equal(plain.body.success, true)
    assert.equal(typeof plain.body.message, 'string')
    assert.equal(plain.body.data.length, 3)
    for (const [i, u] of plain.body.data.entries()) {
      assertHasFields(
        u,
        ['apiKey', 'isActive', 'lastUsed', 'rpmUsage', 'rpdUsage', 'tpmUsage', 'errorCount', 'lastError'],
        'usage-stats entry',
      )
      assert.equal(u.apiKey, mask(srv.keys[i]))
      assert.equal(typeof u.isActive, 'boolean')
      assert.match(u.lastUsed, ISO)
      assert.match(u.rpmUsage, new RegExp(`^\\d+/${LIMITS.rpm}$`))
      assert.match(u.rpdUsage, new RegExp(`^\\d+/${LIMITS.rpd}$`))
      assert.match(u.tpmUsage, new RegExp(`^\\d+/${LIMITS.tpm}$`))
      assert.equal(typeof u.errorCount, 'number')
    }
    assert.equal(plain.body.data[0].tpmUsage.split('/')[0] >= 7, true)

    const ranged = await get(srv.base, '/usage-stats?startDate=2024-01-01&endDate=2024-12-31T23:59:59.000Z')
    assert.equal(ranged.status, 200, ranged.text)
    assert.equal(ranged.body.success, true)
    assert.equal(ranged.body.data.length, 3)
    assert.equal(ranged.body.metadata.startDate, '2024-01-01T00:00:00.000Z')
    assert.equal(ranged.body.metadata.endDate, '2024-12-31T23:59:59.000Z')

    assert.equal((await get(srv.base, '/usage-stats?startDate=2024-01-01')).status, 200)
    assert.equal((await get(srv.base, '/usage-stats?endDate=2024-01-01')).status, 200)

    assertError(await get(srv.base, '/usage-stats?startDate=yesterday'), 400, 'Invalid startDate')
    assertError(await get(srv.base, '/usage-stats?endDate=2024-13-45'), 400, 'Invalid endDate')
    assertError(await get(srv.base, '/usage-stats?startDate=2024-02-01&endDate=2024-01-01'), 400)
  })

  test('unknown paths are 404 JSON, inside and outside /api/keys', async () => {
    for (const p of ['/nope', '/', '', '/status/extra', '/bestx']) {
      assertError(await get(srv.base, p), 404, 'Not found')
    }
    const origin = srv.server.url
    for (const p of ['/', '/status', '/api', '/api/keysx/status']) {
      assertError(await get(origin, p), 404, 'Not found')
    }
  })

  test('a wrong method is a 405 JSON with an Allow header', async () => {
    for (const [method, p, allow] of [
      ['GET', '/rotate', 'POST'],
      ['GET', '/refresh-cache', 'POST'],
      ['GET', '/reset-limits', 'POST'],
      ['GET', `/reactivate/${mask(srv.keys[0])}`, 'POST'],
      ['POST', '/best', 'GET, HEAD'],
      ['POST', '/status', 'GET, HEAD'],
      ['DELETE', '/status', 'GET, HEAD'],
      ['PUT', '/usage-stats', 'GET, HEAD'],
      ['POST', `/rate-limit/${mask(srv.keys[0])}`, 'GET, HEAD'],
    ]) {
      const r = await call(srv.base, method, p)
      assertError(r, 405)
      assert.equal(r.headers.get('allow'), allow, `${method} ${p}`)
    }
  })

  test('a malformed JSON body on a POST is a 400; an empty or JSON body is fine', async () => {
    const json = { 'content-type': 'application/json' }
    for (const p of ['/rotate', '/refresh-cache', '/reset-limits', `/reactivate/${mask(srv.keys[0])}`]) {
      assertError(await post(srv.base, p, { body: '{oops', headers: json }), 400)
      assert.equal((await post(srv.base, p, { body: '{"a":1}', headers: json })).status, 200, p)
      assert.equal((await post(srv.base, p, { body: '' })).status, 200, p)
    }
  })

  test('a body over 64 KiB is a 400; one of exactly 64 KiB is accepted', async () => {
    const json = { 'content-type': 'application/json' }
    const big = JSON.stringify('x'.repeat(64 * 1024)) // valid JSON, 65538 bytes
    assertError(await post(srv.base, '/rotate', { body: big, headers: json }), 400)
    const edge = JSON.stringify('x'.repeat(64 * 1024 - 2)) // exactly 65536 bytes
    assert.equal(Buffer.byteLength(edge), 64 * 1024)
    assert.equal((await post(srv.base, '/rotate', { body: edge, headers: json })).status, 200)
    // And the server still answers afterwards.
    assert.equal((await get(srv.base, '/status')).status, 200)
  })
})

describe('Rust HTTP server: behaviour across calls', () => {
  test('POST /rotate: proactive-rotation when one key is nearly exhausted, always a string reason', async (t) => {
    const limits = { rpm: 10, rpd: 10, tpm: 1000 }
    const { m, keys, base } = await startServer(t, 2, limits)
    const before = await post(base, '/rotate')
    assert.equal(before.status, 200, before.text)
    assert.equal(typeof before.body.data.rotationReason, 'string')
    assert.equal(typeof before.body.metadata.rotationReason, 'string')

    // 9 of 10 requests used: score 0.5*0.1 + 0.3*0.1 + 0.2*1 = 0.28, under the 0.3 threshold.
    for (let i = 0; i < 9; i++) assert.equal((await m.recordUsage(keys[0], 0, true)).success, true)
    const r = await post(base, '/rotate')
    assert.equal(r.status, 200, r.text)
    assert.equal(r.body.message, 'API key rotated proactively')
    assert.equal(r.body.data.rotationReason, 'proactive-rotation')
    assert.equal(r.body.metadata.rotationReason, 'proactive-rotation')
    assert.equal(r.body.data.apiKey, mask(keys[1]))
    assert.ok(r.body.data.availabilityScore > 0.3, r.text)
    assert.equal(typeof r.body.data.previousKeyScore, 'number')
    assert.ok(Math.abs(r.body.data.previousKeyScore - 0.28) < 1e-9, r.text)
    assertLimits(r.body.data.limits, limits)
  })

  test('POST /rotate with no key above the threshold still gives a string reason', async (t) => {
    const limits = { rpm: 10, rpd: 10, tpm: 1000 }
    const { m, keys, base } = await startServer(t, 1, limits)
    for (let i = 0; i < 9; i++) await m.recordUsage(keys[0], 0, true)
    const r = await post(base, '/rotate')
    assert.equal(r.status, 200, r.text)
    assert.equal(typeof r.body.data.rotationReason, 'string')
    assert.ok(r.body.data.rotationReason.length > 0)
    assert.equal(r.body.data.apiKey, mask(keys[0]))
  })

  test('GET /best and POST /rotate with every key busy: 429 with Retry-After and nextAvailableAt; none usable: 503', async (t) => {
    const { m, keys, base } = await startServer(t, 2)
    for (const key of keys) await m.handleRateLimit(key, 'RPM', { retryAfterMs: 30000 })
    for (const r of [await get(base, '/best'), await post(base, '/rotate')]) {
      assertError(r, 429, 'No active API keys available')
      const retryAfter = Number(r.headers.get('retry-after'))
      assert.ok(retryAfter >= 29 && retryAfter <= 30, r.headers.get('retry-after'))
      const at = new Date(r.body.nextAvailableAt).getTime()
      assert.ok(Math.abs(at - (Date.now() + 30000)) < 2000, r.body.nextAvailableAt)
    }
    // /status and /rate-limit still answer, the latter showing RPM limited.
    assert.equal((await get(base, '/status')).status, 200)
    for (const key of keys) {
      const info = await get(base, `/rate-limit/${mask(key)}`)
      assert.equal(info.status, 200, info.text)
      assert.equal(info.body.data[0].isLimited, true, info.text)
    }
    for (const key of keys) await m.disableKey(key)
    assertError(await get(base, '/best'), 503, 'No active API keys available')
  })

  test('GET /best does not count against the key RPM (or RPD/TPM)', async (t) => {
    const { keys, base } = await startServer(t, 3)
    const windows = async () => {
      const r = await get(base, '/status')
      return r.body.data.map((s) => [s.limits.rpm.current, s.limits.rpd.current, s.limits.tpm.current])
    }
    const before = await windows()
    const handedOut = new Set()
    for (let i = 0; i < 12; i++) {
      const r = await get(base, '/best')
      assert.equal(r.status, 200, r.text)
      handedOut.add(r.body.data.apiKey)
    }
    assert.equal(handedOut.size, keys.length, 'round-robin over all keys')
    assert.deepEqual(await windows(), before)
  })

  test('usage made through the JS API is what the HTTP API reports (one pool)', async (t) => {
    const { m, keys, base } = await startServer(t, 2)
    await m.recordUsage(keys[0], 500, true)
    await m.recordUsage(keys[0], 250, true)
    const entry = await statusEntry(base, keys[0])
    assert.equal(entry.limits.rpm.current, 2)
    assert.equal(entry.limits.rpd.current, 2)
    assert.equal(entry.limits.tpm.current, 750)
    await post(base, '/reset-limits')
    const s = await m.getAllKeysStatus()
    assert.equal(s.data.find((k) => k.apiKey === keys[0]).limits.rpm.current, 0)
  })

  test('no full key in any response body, errors and free text included', async (t) => {
    const { m, keys, base } = await startServer(t, 3)
    // A last error that quotes a key, as a Gemini client's URL would.
    await m.recordUsage(keys[1], 0, false, `GET https://generativelanguage.googleapis.com/v1?key=${keys[1]} failed`)
    await m.recordUsage(keys[2], 0, false, `keys ${keys[0]} and ${keys[2]} rejected`)
    const probes = [
      ['GET', '/status'],
      ['GET', '/best'],
      ['POST', '/rotate'],
      ['POST', '/refresh-cache'],
      ['GET', `/rate-limit/${keys[0]}`],
      ['GET', `/rate-limit/${mask(keys[0])}`],
      ['GET', `/rate-limit/${keys[0]}x`],
      ['GET', `/rate-limit/${encodeURIComponent(keys[1])}`],
      ['POST', `/reactivate/${keys[1]}`],
      ['POST', `/reactivate/x${keys[1]}`],
      ['GET', `/reactivate/${keys[1]}`],
      ['GET', '/usage-stats'],
      ['GET', `/usage-stats?startDate=${keys[0]}`],
      ['GET', `/usage-stats?endDate=2024-01-01&key=${keys[0]}`],
      ['GET', `/${keys[0]}`],
      ['GET', `/${keys[0]}/best?key=${keys[1]}`],
      ['POST', `/best?key=${keys[2]}`],
      ['POST', '/rotate', `{"key":"${keys[0]}"`],
      ['POST', '/reset-limits'],
    ]
    for (const [method, p, body] of probes) {
      const r = await call(base, method, p, { body }) // call() asserts no full key in the body
      assert.equal(typeof r.body.success, 'boolean', `${method} ${p}`)
    }
    const usage = await get(base, '/usage-stats')
    assert.match(usage.body.data[1].lastError, new RegExp(`key=${mask(keys[1]).replace(/\./g, '\\.')}`))
  })
})

// ------------------------------------------------------------------------------------------------
// 2. The CLI, and the operators' test-fast-rotation.js run against it unchanged (SPEC section 5).
// ------------------------------------------------------------------------------------------------

/** The environment for a child: no GEMINI_*, no proxies, plus `extra`. */
function childEnv(extra) {
  const env = cleanEnv(extra)
  for (const k of Object.keys(env)) if (/^(https?_proxy|all_proxy|no_proxy|HOST|PORT)$/i.test(k)) delete env[k]
  return { ...env, ...extra }
}

/** Runs a child; `waitFor(re)` resolves with the match once its stdout matches, `exited` with its end. */
function runChild(args, env) {
  const child = spawn(process.execPath, args, { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  const waiters = []
  const check = () => {
    for (const w of waiters.slice()) {
      const m = stdout.match(w.re)
      if (m) {
        waiters.splice(waiters.indexOf(w), 1)
        w.resolve(m)
      }
    }
  }
  child.stdout.setEncoding('utf8').on('data', (d) => {
    stdout += d
    check()
  })
  child.stderr.setEncoding('utf8').on('data', (d) => {
    stderr += d
  })
  const exited = new Promise((resolve) => {
    child.on('close', (code, signal) => {
      for (const w of waiters.splice(0)) {
        w.reject(new Error(`child exited (${code ?? signal}) before printing ${w.re}\nstdout:\n${stdout}\nstderr:\n${stderr}`))
      }
      resolve({ code, signal })
    })
  })
  return {
    child,
    exited,
    get stdout() {
      return stdout
    },
    get stderr() {
      return stderr
    },
    waitFor(re) {
      return new Promise((resolve, reject) => {
        waiters.push({ re, resolve, reject })
        check()
        if (child.exitCode !== null || child.signalCode !== null) {
          reject(new Error(`child already exited before printing ${re}`))
        }
      })
    },
    stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
      return exited
    },
  }
}

const CLI_KEYS = newKeys(5)

/** `gemini-key-manager serve --port 0` with five keys from GEMINI_API_KEY_1..5. */
async function startCli(t, extraEnv = {}) {
  const env = childEnv({
    GEMINI_API_KEY_1: CLI_KEYS[0],
    GEMINI_API_KEY_2: CLI_KEYS[1],
    GEMINI_API_KEY_3: CLI_KEYS[2],
    GEMINI_API_KEY_4: CLI_KEYS[3],
    GEMINI_API_KEY_5: CLI_KEYS[4],
    GEMINI_RPM_LIMIT: '1000',
    GEMINI_RPD_LIMIT: '100000',
    GEMINI_TPM_LIMIT: '100000000',
    ...extraEnv,
  })
  const cli = runChild([CLI, 'serve', '--port', '0'], env)
  t.after(() => cli.stop())
  const m = await cli.waitFor(/listening on (http:\/\/([^\s/]+):(\d+))\/api\/keys/)
  return { cli, url: m[1], host: m[2], port: Number(m[3]) }
}

describe('CLI and the operators\' test-fast-rotation.js (SPEC section 5)', () => {
  test('test-fast-rotation.js runs unchanged against `gemini-key-manager serve`', { timeout: 60000 }, async (t) => {
    const { cli, port } = await startCli(t)
    assert.match(cli.stdout, /✅ In-memory API Key Manager initialized with 5 keys/)
    // The script's default is http://localhost:3001; only the port differs here.
    const run = runChild([path.join(FIXTURES, 'test-fast-rotation.js')], childEnv({ KEY_MANAGER_URL: `http://localhost:${port}` }))
    t.after(() => run.stop())
    const { code } = await run.exited
    const out = run.stdout
    const report = `\nstdout:\n${out}\nstderr:\n${run.stderr}`
    assert.equal(code, 0, report)
    assert.ok(!out.includes('❌') && !run.stderr.includes('❌'), report)
    assertNoFullKey(out, 'test-fast-rotation.js output')

    assert.match(out, /Found 5 total keys, 5 active/, report)

    const masks = CLI_KEYS.map(mask)
    const sequential = [...out.matchAll(/^ {2}Request (\d+): (\S+) - (\S+)$/gm)]
    assert.deepEqual(
      sequential.map((m) => Number(m[1])),
      [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
      report,
    )
    for (const m of sequential) {
      assert.ok(['round-robin', 'cached-round-robin'].includes(m[2]), m[0])
      assert.ok(masks.includes(m[3]), `${m[3]} is not a masked key of the pool`)
    }

    assert.match(out, /✅ Rotated to: AIzaSy\S{2}\.\.\.\S{4}\n/, report)
    const reason = out.match(/^ {3}Reason: (.*)$/m)
    assert.ok(reason, report)
    assert.ok(reason[1].length > 0 && reason[1] !== 'undefined' && reason[1] !== 'null', reason[0])
    assert.match(out, /^ {3}Score: \d+\.\d\d$/m, report)

    assert.match(out, /✅ API key cache refreshed successfully/, report)

    assert.match(out, /✅ 20\/20 requests successful/, report)
    const cached = out.match(/📈 (\d+)\/20 used cached round-robin/)
    assert.ok(cached, report)
    assert.ok(Number(cached[1]) >= 15, `only ${cached[1]}/20 concurrent /best were cached-round-robin${report}`)
    assert.match(out, /Average time per request: \d+(\.\d+)?ms/, report)
    assert.match(out, /Old system: 100-500ms per rotation/, report)
  })

  test('CLI: by default localhost answers on ::1 and on 127.0.0.1; an explicit HOST binds exactly that', { timeout: 30000 }, async (t) => {
    const answers = async (host, port) => {
      try {
        const r = await fetch(`http://${host}:${port}/api/keys/status`)
        return r.status
      } catch {
        return 'refused'
      }
    }
    const { url, port } = await startCli(t)
    assert.equal(url, `http://localhost:${port}`)
    assert.equal(await answers('[::1]', port), 200)
    assert.equal(await answers('127.0.0.1', port), 200)
    assert.equal(await answers('localhost', port), 200)
    const v4 = await startCli(t, { HOST: '127.0.0.1' })
    assert.equal(await answers('127.0.0.1', v4.port), 200)
    assert.equal(await answers('[::1]', v4.port), 'refused')
    const v6 = await startCli(t, { HOST: '::1' })
    assert.equal(v6.url, `http://[::1]:${v6.port}`)
    assert.equal(await answers('[::1]', v6.port), 200)
    assert.equal(await answers('127.0.0.1', v6.port), 'refused')
  })

  test('CLI: no keys in the environment exits non-zero with the SPEC message and no stack trace', async () => {
    const cli = runChild([CLI, 'serve', '--port', '0'], childEnv({}))
    const { code } = await cli.exited
    assert.notEqual(code, 0)
    assert.match(cli.stderr, /No Gemini API keys provided in environment variables/)
    assert.doesNotMatch(cli.stderr, /\n\s+at /, `a stack trace was printed:\n${cli.stderr}`)
    assert.doesNotMatch(cli.stdout, /listening on/)
  })

  test('CLI: SIGTERM exits 0 after the shutdown line and answers a request already in flight', { timeout: 30000 }, async (t) => {
    const { cli, host, port } = await startCli(t)
    // Hold a POST open: headers with Expect: 100-continue, so that the server's "100 Continue"
    // proves it is reading this request's body, then one byte of the two-byte body.
    const sock = net.connect(port, host)
    t.after(() => sock.destroy())
    let received = ''
    let waiter = null
    sock.setEncoding('utf8')
    sock.on('data', (d) => {
      received += d
      if (waiter && waiter.re.test(received)) waiter.resolve()
    })
    sock.on('error', (e) => waiter && waiter.reject(e))
    sock.on('close', () => waiter && waiter.reject(new Error(`socket closed; received:\n${received}`)))
    const waitForReply = (re) =>
      new Promise((resolve, reject) => {
        waiter = { re, resolve, reject }
        if (re.test(received)) resolve()
      })
    await new Promise((resolve, reject) => sock.once('connect', resolve).once('error', reject))
    const gotContinue = waitForReply(/^HTTP\/1\.1 100 Continue\r\n\r\n/)
    sock.write(
      `POST /api/keys/rotate HTTP/1.1\r\nHost: ${host}:${port}\r\nContent-Type: application/json\r\n` +
        'Content-Length: 2\r\nExpect: 100-continue\r\n\r\n',
    )
    await gotContinue
    sock.write('{')

    cli.child.kill('SIGTERM')
    await cli.waitFor(/🛑 Shutting down[^\n]*\n/)
    // The listener is closed once the shutdown has begun: new connections are refused.
    let refused = false
    for (let i = 0; i < 100 && !refused; i++) {
      refused = await new Promise((resolve) => {
        const probe = net.connect(port, host)
        probe.once('connect', () => {
          probe.destroy()
          setTimeout(() => resolve(false), 20)
        })
        probe.once('error', () => resolve(true))
      })
    }
    assert.ok(refused, 'the server still accepts connections after SIGTERM')

    // The request in flight is still answered.
    // The server closes the connection once it has answered (it is shutting down).
    const gotReply = new Promise((resolve) => sock.once('end', resolve))
    sock.write('}')
    await gotReply
    const [head, body] = received.split('\r\n\r\n').slice(1)
    assert.match(head, /^HTTP\/1\.1 200 /, received)
    const json = JSON.parse(body)
    assert.equal(json.success, true)
    assert.equal(json.message, 'API key rotated proactively')
    assertNoFullKey(body, 'in-flight /rotate')

    const { code, signal } = await cli.exited
    assert.equal(signal, null, cli.stderr)
    assert.equal(code, 0, `stdout:\n${cli.stdout}\nstderr:\n${cli.stderr}`)
    assert.match(cli.stdout, /🛑 Shutting down: finishing in-flight requests/)
  })
})

// ------------------------------------------------------------------------------------------------
// 3. The Express adapter, against the Rust server over the same manager.
// ------------------------------------------------------------------------------------------------

function listen(app) {
  return new Promise((resolve, reject) => {
    const server = app.listen(0, '127.0.0.1', () => resolve(server))
    server.once('error', reject)
  })
}

/** The structure of a JSON value: object keys (recursively) and value types, without the values. */
function shapeOf(v) {
  if (Array.isArray(v)) return v.map(shapeOf)
  if (v !== null && typeof v === 'object') {
    return Object.fromEntries(Object.keys(v).sort().map((k) => [k, shapeOf(v[k])]))
  }
  return v === null ? 'null' : typeof v
}

describe('Express adapter: keyRoutes(manager) behind app.use("/api/keys")', () => {
  let srv
  let app
  let httpServer
  let expressBase
  before(async () => {
    srv = await startServer(null, 3)
    app = express()
    app.use('/api/keys', keyRoutes(srv.m))
    httpServer = await listen(app)
    expressBase = `http://127.0.0.1:${httpServer.address().port}/api/keys`
  })
  after(async () => {
    await new Promise((resolve) => {
      httpServer.close(resolve)
      httpServer.closeAllConnections()
    })
    await srv.cleanup()
  })

  test('read-only endpoints answer as the Rust server does (same status, same JSON but for dates)', async () => {
    for (const p of [
      '/status',
      `/rate-limit/${mask(srv.keys[0])}`,
      `/rate-limit/${srv.keys[1]}`,
      '/rate-limit/AIzaSyZZ...9999',
      '/rate-limit/',
      '/usage-stats',
      '/usage-stats?startDate=2024-01-01',
      '/usage-stats?startDate=bad',
      '/nope',
      '/status/extra',
    ]) {
      const viaExpress = await get(expressBase, p)
      const viaRust = await get(srv.base, p)
      assert.equal(viaExpress.status, viaRust.status, p)
      // Empty windows report their reset as "now", so dates differ between two calls.
      assert.deepEqual(withoutDates(viaExpress.body), withoutDates(viaRust.body), p)
    }
  })

  test('GET /openapi.json: docs/openapi.json, as the Rust server serves it', async () => {
    const spec = JSON.parse(fs.readFileSync(path.join(PKG, 'docs', 'openapi.json'), 'utf8'))
    for (const base of [expressBase, srv.base]) {
      const r = await get(base, '/openapi.json')
      assert.equal(r.status, 200, `${base}: ${r.text}`)
      assert.deepEqual(r.body, spec, base)
    }
  })

  test('/best, /rotate and /refresh-cache: same status codes and JSON shapes', async () => {
    for (const [method, p] of [
      ['GET', '/best'],
      ['GET', '/best'],
      ['POST', '/rotate'],
      ['POST', '/refresh-cache'],
      ['GET', '/best'],
    ]) {
      const viaExpress = await call(expressBase, method, p)
      const viaRust = await call(srv.base, method, p)
      assert.equal(viaExpress.status, 200, `${method} ${p}: ${viaExpress.text}`)
      assert.equal(viaExpress.status, viaRust.status, `${method} ${p}`)
      assert.deepEqual(shapeOf(viaExpress.body), shapeOf(viaRust.body), `${method} ${p}`)
      assert.equal(viaExpress.body.message, viaRust.body.message)
    }
  })

  test('unknown paths under the mount are 404 JSON and wrong methods 405 with Allow, as in Rust', async () => {
    for (const [method, p] of [
      ['GET', '/nope'],
      ['GET', '/'],
      ['POST', '/nope'],
      ['GET', '/rotate'],
      ['POST', '/best'],
      ['DELETE', '/status'],
      ['GET', `/reactivate/${mask(srv.keys[0])}`],
    ]) {
      const viaExpress = await call(expressBase, method, p)
      const viaRust = await call(srv.base, method, p)
      assert.ok([404, 405].includes(viaExpress.status), `${method} ${p}: ${viaExpress.status}`)
      assert.equal(viaExpress.status, viaRust.status, `${method} ${p}`)
      assert.deepEqual(viaExpress.body, viaRust.body, `${method} ${p}`)
      assert.equal(viaExpress.headers.get('allow'), viaRust.headers.get('allow'), `${method} ${p}`)
    }
  })

  test('POST /reactivate and /reset-limits, and a malformed JSON body (400), as in Rust', async () => {
    const json = { 'content-type': 'application/json' }
    for (const p of [`/reactivate/${mask(srv.keys[2])}`, '/reset-limits', '/rotate']) {
      const ok = await post(expressBase, p, { body: '{"x":1}', headers: json })
      assert.equal(ok.status, 200, `${p}: ${ok.text}`)
      const bad = await post(expressBase, p, { body: '{oops', headers: json })
      const badRust = await post(srv.base, p, { body: '{oops', headers: json })
      assertError(bad, 400)
      assert.deepEqual(bad.body, badRust.body)
    }
  })

  test('with express.json() before the router (body already parsed), POSTs still work', async (t) => {
    const parsed = express()
    parsed.use(express.json())
    parsed.use('/api/keys', keyRoutes(srv.m))
    const server = await listen(parsed)
    t.after(
      () =>
        new Promise((resolve) => {
          server.close(resolve)
          server.closeAllConnections()
        }),
    )
    const base = `http://127.0.0.1:${server.address().port}/api/keys`
    const json = { 'content-type': 'application/json' }
    for (const [p, body] of [
      ['/rotate', '{"reason":"test"}'],
      ['/rotate', undefined],
      ['/refresh-cache', '{}'],
      [`/reactivate/${mask(srv.keys[1])}`, '{"a":[1,2,3]}'],
      ['/reset-limits', undefined],
    ]) {
      const r = await post(base, p, { body, headers: body === undefined ? undefined : json })
      assert.equal(r.status, 200, `${p}: ${r.text}`)
      assert.equal(r.body.success, true)
    }
    const best = await get(base, '/best')
    assert.equal(best.status, 200, best.text)
    assert.deepEqual(shapeOf(best.body), shapeOf((await get(srv.base, '/best')).body))
  })

  // Bug: readBody() in lib/index.js calls req.destroy() on an oversized body, which destroys the
  // socket before the 400 is written; the client sees a reset instead of the Rust server's 400.
  test('a body over 64 KiB is a 400 JSON, as from the Rust server', async () => {
    const json = { 'content-type': 'application/json' }
    const big = JSON.stringify('x'.repeat(64 * 1024))
    const viaRust = await post(srv.base, '/rotate', { body: big, headers: json })
    assertError(viaRust, 400)
    let viaExpress
    try {
      viaExpress = await post(expressBase, '/rotate', { body: big, headers: json })
    } catch (e) {
      assert.fail(`the Express adapter dropped the connection instead of answering 400: ${e.cause?.code ?? e.message}`)
    }
    assertError(viaExpress, 400)
  })

  // Bug: readBody() in lib/index.js treats a request without Content-Length as bodiless, so a
  // chunked (Transfer-Encoding: chunked) body is never read nor checked: malformed JSON is a 200
  // through Express but a 400 from the Rust server.
  test('a chunked POST body is read and checked as the Rust server does', async () => {
    const rawPost = (port) =>
      new Promise((resolve, reject) => {
        const sock = net.connect(port, '127.0.0.1', () => {
          sock.write(
            'POST /api/keys/rotate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n' +
              'Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{oops\r\n0\r\n\r\n',
          )
        })
        let data = ''
        sock.setEncoding('utf8')
        sock.on('data', (d) => (data += d))
        sock.on('end', () => resolve(Number(data.split(' ')[1])))
        sock.on('error', reject)
      })
    const rustStatus = await rawPost(srv.server.port)
    assert.equal(rustStatus, 400)
    assert.equal(await rawPost(httpServer.address().port), rustStatus)
  })
})

test('a key added over HTTP and handed out before JS knows it shows its own figures', async (t) => {
  const { m, keys, base } = await startServer(t, 1)
  const added = newKeys(2)
  for (const apiKey of added) {
    const r = await post(base, '/add', { body: JSON.stringify({ apiKey }), headers: { 'content-type': 'application/json' } })
    assert.equal(r.status, 201)
  }
  // Only the first added key is left to hand out: it is not the last one JS learns of.
  assert.equal((await post(base, `/disable/${keys[0]}`)).status, 200)
  assert.equal((await post(base, `/disable/${added[1]}`)).status, 200)
  const r = await m.getBestAvailableKey({ estimatedTokens: 250 })
  assert.equal(r.success, true)
  const [apiKey, status] = r.data
  assert.equal(apiKey, added[0])
  assert.equal(status.apiKey, added[0])
  // The hand-out's reservation, on its own figures.
  assert.equal(status.limits.rpm.current, 1)
  assert.equal(status.limits.tpm.current, 250)
})
