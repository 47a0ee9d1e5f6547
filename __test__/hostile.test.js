'use strict'

// Hostile input at the JS face (lib/index.js): wrong types, NaN, huge strings, symbols, BigInts,
// objects whose getters or conversions throw, revoked proxies, ... thrown at every entry point,
// one argument at a time and then at random (seeded, so a failure can be replayed). The SPEC's
// methods must resolve (never throw, never reject) to a success or `{ success: false, error,
// metadata }` naming no full key; execute and serve may reject, with an Error; the constructor
// never throws; and the process neither crashes nor leaves an unhandled rejection behind.

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')

const { PKG, fakeKey, mask, settle, prng } = require('./helpers')
const { ApiKeyManagerService } = require(PKG)

const SEED = Number(process.env.HOSTILE_SEED ?? 0x6b657973)
const RANDOM_CALLS = 400
const KEYS = [fakeKey(701), fakeKey(702), fakeKey(703)]
const LIMITS = { rpm: 1000000, rpd: 1000000, tpm: 1000000000 }

const boom = () => {
  throw new Error('hostile getter')
}

/** A proxy every operation on which throws. */
function trap() {
  const h = {}
  for (const name of ['get', 'set', 'has', 'ownKeys', 'getPrototypeOf', 'getOwnPropertyDescriptor', 'apply', 'construct', 'defineProperty', 'deleteProperty']) h[name] = boom
  return new Proxy(function () {}, h)
}

function revoked() {
  const { proxy, revoke } = Proxy.revocable({}, {})
  revoke()
  return proxy
}

/** An object whose every interesting property throws when read. */
function throwingGetters() {
  const o = {}
  for (const name of ['estimatedTokens', 'retryAfterMs', 'maxAttempts', 'maxWaitMs', 'message', 'status', 'statusCode', 'code', 'response', 'errorDetails', 'error', 'keys', 'limits', 'model', 'modelLimits', 'windowMs', 'quiet', 'mongodbUri', 'mongodbDbName', 'dailyReset', 'reservationTtlMs', 'usageMetadata', 'then', 'rpm', 'rpd', 'tpm']) {
    Object.defineProperty(o, name, { get: boom, enumerable: true })
  }
  return o
}

/** Fresh hostile values (some are stateful, so each use gets new ones). */
function hostileValues() {
  const circular = { a: 1 }
  circular.self = circular
  return [
    undefined, null, NaN, Infinity, -Infinity, -0, 0, -1, 0.5, 2 ** 53 + 2, 1e308, -1e308, Number.MIN_VALUE,
    10n, 2n ** 70n, -1n,
    '', ' ', '\u0000', '\ud800', 'x'.repeat(1 << 20), '🔑'.repeat(5000), 'RPM', 'rpd', '__proto__', 'constructor', '429', 'API_KEY_INVALID',
    KEYS[0], mask(KEYS[0]), `${KEYS[0]} `, KEYS[0].toLowerCase(),
    Symbol('hostile'), Symbol.iterator,
    true, false,
    [], [1, 2], [KEYS[0]], new Array(5), new Uint8Array(8),
    {}, Object.create(null), Object.freeze({ estimatedTokens: -5 }), { estimatedTokens: 'many' }, { estimatedTokens: 1e300 },
    { retryAfterMs: -1 }, { retryAfterMs: Infinity }, { maxAttempts: 1e9, maxWaitMs: -1 },
    { valueOf: boom }, { toString: boom }, { [Symbol.toPrimitive]: boom }, { toJSON: boom },
    circular, throwingGetters(), trap(), revoked(),
    () => {}, async () => {}, new Date(NaN), /hostile/, new Error('hostile'), Object.assign(new Error('x'), { status: trap() }),
    new Map([[1, 2]]), new WeakMap(), Promise.resolve(1),
  ]
}

function pickFrom(rand, values) {
  return values[Math.floor(rand() * values.length)]
}

/** A string form of any value, even one whose conversion throws, for assertion messages. */
function describe(v) {
  try {
    if (typeof v === 'string') return v.length > 40 ? `string(${v.length})` : JSON.stringify(v)
    if (typeof v === 'bigint') return `${v}n`
    if (typeof v === 'symbol') return v.toString()
    return Object.prototype.toString.call(v)
  } catch {
    return '<undescribable>'
  }
}

function assertSaneResult(r, where) {
  assert.equal(typeof r, 'object', where)
  assert.ok(r !== null, where)
  assert.equal(typeof r.success, 'boolean', where)
  assert.equal(typeof r.metadata, 'object', where)
  assert.ok(r.metadata !== null, where)
  if (!r.success) {
    assert.equal(typeof r.error, 'string', `${where}: ${describe(r.error)}`)
    assert.ok(r.error.length > 0 && r.error.length < 10000, `${where}: error of length ${r.error.length}`)
    for (const k of KEYS) assert.ok(!r.error.includes(k), `${where}: a full key in ${r.error}`)
  }
}

/**
 * Expects `fn()` to reject (or resolve) without throwing synchronously; a rejection is an Error, or
 * one of `own` (what the caller's own code threw, which execute passes on as it is).
 */
async function settlesOrRejectsWithError(fn, where, own = new Set()) {
  let p
  try {
    p = fn()
  } catch (e) {
    assert.fail(`${where}: threw synchronously: ${e && e.stack}`)
  }
  assert.ok(p instanceof Promise, `${where}: not a Promise`)
  try {
    return { value: await p }
  } catch (e) {
    if (own.has(e)) return { error: e }
    assert.ok(e instanceof Error, `${where}: rejected with ${describe(e)}, not an Error`)
    for (const k of KEYS) assert.ok(!String(e.message).includes(k), `${where}: a full key in ${e.message}`)
    return { error: e }
  }
}

const unhandled = []
const onUnhandled = (e) => unhandled.push(e)
before(() => process.on('unhandledRejection', onUnhandled))
after(() => process.removeListener('unhandledRejection', onUnhandled))

function newManager() {
  return new ApiKeyManagerService({ keys: KEYS, limits: LIMITS, quiet: true })
}

/** The SPEC's methods, with the arguments they get. */
const METHODS = {
  initialize: (m, a) => m.initialize(a),
  getBestAvailableKey: (m, a) => m.getBestAvailableKey(a),
  getNextKeyForRotation: (m, a) => m.getNextKeyForRotation(a),
  recordUsage: (m, a, b, c, d, e) => m.recordUsage(a, b, c, d, e),
  handleRateLimit: (m, a, b, c) => m.handleRateLimit(a, b, c),
  getRateLimitInfo: (m, a) => m.getRateLimitInfo(a),
  getAllKeysStatus: (m, a) => m.getAllKeysStatus(a),
  reactivateKey: (m, a) => m.reactivateKey(a),
  resetAllLimits: (m, a) => m.resetAllLimits(a),
  refreshCache: (m, a) => m.refreshCache(a),
  addKey: (m, a) => m.addKey(a),
  disableKey: (m, a) => m.disableKey(a),
  enableKey: (m, a) => m.enableKey(a),
  removeKey: (m, a) => m.removeKey(a),
}

/** Good values for each argument position, so one hostile argument at a time reaches deep. */
const GOOD = {
  recordUsage: [KEYS[0], 10, true, undefined, 5],
  handleRateLimit: [KEYS[1], 'RPM', { retryAfterMs: 1 }],
  getRateLimitInfo: [KEYS[0]],
  reactivateKey: [KEYS[0]],
  disableKey: [KEYS[2]],
  enableKey: [KEYS[2]],
}

test('every SPEC method, one hostile argument at a time: a sane result, never a throw or rejection', async () => {
  const m = newManager()
  for (const [name, call] of Object.entries(METHODS)) {
    const good = GOOD[name] ?? [undefined]
    for (let position = 0; position < good.length; position++) {
      for (const value of hostileValues()) {
        const args = good.slice()
        args[position] = value
        const where = `${name} argument ${position} = ${describe(value)}`
        assertSaneResult(await settle(() => call(m, ...args)), where)
      }
    }
    // The failure flag recordUsage also reads: hostile values where `success` goes.
  }
  // Still serving.
  await m.resetAllLimits()
  const r = await m.getBestAvailableKey()
  assert.equal(r.success, true, r.error)
  assert.equal((await m.recordUsage(r.data[0], 1, true)).success, true)
})

test(`${RANDOM_CALLS} random calls with random hostile arguments (seed ${SEED})`, async () => {
  const rand = prng(SEED)
  const m = newManager()
  const names = Object.keys(METHODS)
  for (let i = 0; i < RANDOM_CALLS; i++) {
    const name = pickFrom(rand, names)
    const values = [...hostileValues(), ...KEYS, 1, 100, 'TPM', true]
    const args = Array.from({ length: 5 }, () => pickFrom(rand, values))
    const where = `call ${i} (seed ${SEED}): ${name}(${args.map(describe).join(', ')})`
    assertSaneResult(await settle(() => METHODS[name](m, ...args)), where)
  }
  await m.resetAllLimits()
  for (const k of KEYS) {
    // The random calls may have removed or disabled it.
    await m.addKey(k)
    await m.enableKey(k)
    await m.reactivateKey(k)
  }
  assert.equal((await m.getBestAvailableKey()).success, true)
})

test('the constructor takes any options without throwing; initialize and selection then answer sanely', async () => {
  for (const options of hostileValues()) {
    const where = `new ApiKeyManagerService(${describe(options)})`
    let m
    try {
      m = new ApiKeyManagerService(options)
    } catch (e) {
      assert.fail(`${where} threw: ${e && e.stack}`)
    }
    assertSaneResult(await settle(() => m.initialize()), `${where}.initialize()`)
    assertSaneResult(await settle(() => m.getBestAvailableKey()), `${where}.getBestAvailableKey()`)
    await m.close()
  }
  // Valid keys with one hostile option each.
  for (const field of ['keys', 'model', 'modelLimits', 'limits', 'windowMs', 'dailyReset', 'reservationTtlMs', 'quiet', 'mongodbUri', 'mongodbDbName', 'usageBatchSize']) {
    for (const value of hostileValues()) {
      const options = { keys: KEYS, limits: LIMITS, quiet: true, [field]: value }
      if (field === 'quiet' || field === 'mongodbUri') options.mongoConnectTimeoutMs = 50
      const where = `options.${field} = ${describe(value)}`
      let m
      try {
        m = new ApiKeyManagerService(options)
      } catch (e) {
        assert.fail(`${where}: the constructor threw: ${e && e.stack}`)
      }
      assertSaneResult(await settle(() => m.initialize()), where)
      await m.close()
    }
  }
})

test('execute with hostile calls and options settles: resolves, or rejects with an Error', async () => {
  const thrown = { trap: trap(), symbol: Symbol('thrown'), revoked: revoked() }
  const own = new Set([...Object.values(thrown), null])
  const calls = [
    ...hostileValues(),
    () => trap(),
    () => ({ response: trap() }),
    () => ({ response: { usageMetadata: { totalTokenCount: 1e300 } } }),
    () => ({ usageMetadata: throwingGetters() }),
    () => {
      throw thrown.trap
    },
    () => {
      throw thrown.symbol
    },
    () => {
      throw null
    },
    () => Promise.reject(thrown.revoked),
    () => {
      throw Object.assign(new Error('429 RESOURCE_EXHAUSTED'), { errorDetails: trap() })
    },
  ]
  const options = [undefined, ...hostileValues()]
  const rand = prng(SEED + 1)
  const cases = [
    ...calls.map((call) => [call, { maxAttempts: 2 }]),
    ...options.map((o) => [async () => 'ok', o]),
    ...Array.from({ length: 60 }, () => [pickFrom(rand, calls), pickFrom(rand, options)]),
  ]
  for (const [call, opts] of cases) {
    const m = newManager()
    const where = `execute(${describe(call)}, ${describe(opts)})`
    const outcome = await Promise.race([
      settlesOrRejectsWithError(() => m.execute(call, opts), where, own),
      new Promise((resolve) => setTimeout(() => resolve({ hung: true }), 5000).unref()),
    ])
    assert.ok(!outcome.hung, `${where} did not settle in 5 s`)
    await m.close()
  }
})

test('serve with hostile options rejects with an Error (or listens on loopback, and closes)', async () => {
  // Always a loopback host and port 0 unless that is the field under test, so nothing listens on
  // a fixed port or beyond this machine.
  const cases = [null, Symbol('s'), trap(), revoked(), throwingGetters()].map((o) => [o, describe(o)])
  for (const field of ['port', 'host', 'accessLog', 'maxBodyBytes', 'adminToken', 'allowInsecure']) {
    for (const value of hostileValues()) {
      if (field === 'port' && value === undefined) continue
      cases.push([{ host: '127.0.0.1', port: 0, [field]: value }, `{ ${field}: ${describe(value)} }`])
    }
  }
  const m = newManager()
  for (const [options, label] of cases) {
    const where = `serve(${label})`
    const outcome = await settlesOrRejectsWithError(() => m.serve(options), where)
    if (outcome.value) {
      // Closed first, so a failed check leaves nothing listening.
      await outcome.value.close()
      assert.ok(['127.0.0.1', 'localhost'].includes(outcome.value.host), `${where}: ${outcome.value.host}`)
    }
  }
  await m.close()
})

test('no unhandled rejection was left behind', async () => {
  await new Promise((resolve) => setTimeout(resolve, 50))
  assert.deepEqual(unhandled.map(describe), [])
})
