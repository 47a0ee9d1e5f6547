'use strict'

// Issue 11 point 7, faults 3 and 4: a hung database (nx-27017 stopped with SIGSTOP, its sockets
// open and silent). During selection, leases time out and keys serve a local share, so no
// selection fails while the limit has room; at shutdown, closing waits at most closeTimeoutMs and
// keeps what MongoDB did not take in a spill file, which the next process writes, each call once.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')
const { mask } = require('../helpers')
const { FIXTURES, KEYS, eventually, inspect, sleep, start, startFixture, startNx, storedCalls, tempDir } = require('./support')

const BIN = path.resolve(__dirname, '..', '..', 'bin', 'gemini-key-manager.js')
// What was kept is said in words: `100 recorded calls, the state of 3 keys and the counts of 3 quota budgets`, `1 operator decision`.
const SPILL_LINE = /MongoDB did not take (.+) before closing: kept in (\S+), written at the next start/
const CLOSE_TIMEOUT_MS = 3000
// What closing may take past closeTimeoutMs: giving leases back (200 ms at most), the driver's
// shutdown (100 ms), a process start-up's worth of noise on a shared machine.
const CLOSE_SLACK_MS = 2500

/** Values from 0 to 499 counted in 50 ms buckets: `0-49: n, ...`, empty buckets left out. */
function histogram(values) {
  const buckets = new Map()
  for (const v of values) {
    const bucket = Math.floor(v / 50) * 50
    buckets.set(bucket, (buckets.get(bucket) ?? 0) + 1)
  }
  return [...buckets.entries()]
    .sort(([a], [b]) => a - b)
    .map(([b, n]) => `${b}-${b + 49}: ${n}`)
    .join(', ')
}

/** Every file under `dir`, recursively. */
function filesUnder(dir) {
  if (!fs.existsSync(dir)) return []
  return fs.readdirSync(dir, { recursive: true }).filter((f) => fs.statSync(path.join(dir, f)).isFile())
}

// Limits that never bind; 2 s windows make 500 ms slices, so a 3 s hang spans several boundaries.
const SELECTION = { limits: { rpm: 100000, rpd: 1000000, tpm: 1e12 }, windowMs: 2000, flushIntervalMs: 200 }

test('a database hung for 3 s during selection: keys serve a local share within a slice, no long gap', async (t) => {
  const server = await startNx(t)
  const plan = { keys: KEYS, callers: 3, pauseMs: 5, options: { ...SELECTION, mongodbDbName: 'gkm_hung_select' } }
  const children = [0, 1].map(() => startFixture(t, 'selector.js', plan, { MONGODB_URI: server.uri }))
  for (const c of children) assert.notEqual((await c.json('READY', 30000)).mode, 'in-memory')
  // Long enough for each process to have leased alongside the other.
  await sleep(2500)
  const seen = children.map((c) => c.lines.length)
  const hungAt = Date.now()
  server.hang()
  await sleep(3000)
  server.resume()
  const resumedAt = Date.now()
  await sleep(2000)
  for (const c of children) c.send('stop')
  const results = []
  for (const c of children) results.push(await c.json('RESULT', 30000))
  for (const c of children) assert.equal((await c.waitExit(15000)).code, 0, c.output())

  const report = children.map((c, i) => {
    const r = results[i]
    const fellBack = c.lines.slice(seen[i]).find((l) => /Shared quota: MongoDB cannot be reached/.test(l.text))
    const back = c.lines.slice(seen[i]).find((l) => l.at >= resumedAt && /Shared quota: leasing from MongoDB again/.test(l.text))
    // The longest stretches without a selection that overlap the hang, and that come after it.
    const inHang = r.gaps.filter(([from, gap]) => from + gap >= hungAt && from <= resumedAt)
    const afterHang = r.gaps.filter(([from]) => from > resumedAt)
    const late = r.failedAt.filter((at) => at >= resumedAt)
    return {
      selections: r.selections,
      failedBefore: r.failedAt.filter((at) => at < hungAt).length,
      failedDuring: r.failedAt.filter((at) => at >= hungAt && at < resumedAt).length,
      failedAfter: late.length,
      failedAfterSpan: late.length === 0 ? '' : ` ${late[0] - resumedAt}..${late.at(-1) - resumedAt} ms after SIGCONT`,
      // Times from the SIGSTOP; how far into its 500 ms slice each failure came.
      errors: r.errors.filter(([at]) => at >= hungAt).map(([at, error, next]) => [at - hungAt, error, next && Date.parse(next) - hungAt]),
      failedIntoSlice: histogram(r.failedAt.filter((at) => at >= hungAt).map((at) => at % 500)),
      maxGapMs: r.maxGapMs,
      maxGapInHangMs: Math.max(0, ...inHang.map(([, gap]) => gap)),
      maxGapAfterMs: Math.max(0, ...afterHang.map(([, gap]) => gap)),
      fallbackMs: fellBack ? fellBack.at - hungAt : null,
      recoveryMs: back ? back.at - resumedAt : null,
      peers: r.stats.peers,
    }
  })
  t.diagnostic(
    report
      .map(
        (r, i) =>
          `process ${i + 1}: ${r.selections} selections, failed ${r.failedBefore} before the hang, ${r.failedDuring} during, ` +
          `${r.failedAfter} after${r.failedAfterSpan} (ms into the slice: ${r.failedIntoSlice || 'none'}), longest gap ${r.maxGapMs} ms ` +
          `(over 100 ms: ${r.maxGapInHangMs} during the hang, ${r.maxGapAfterMs} after), local share after ${r.fallbackMs} ms, ` +
          `leasing again ${r.recoveryMs} ms after SIGCONT, peers ${r.peers}`,
      )
      .join('; '),
  )
  for (const [i, r] of report.entries()) {
    assert.ok(r.maxGapMs < 1000, `process ${i + 1}: no selection for ${r.maxGapMs} ms`)
    assert.ok(r.fallbackMs !== null, `process ${i + 1} never said it serves a local share:\n${children[i].output()}`)
  }
  await t.test('no selection fails during the hang or after it', () => {
    for (const [i, r] of report.entries()) {
      assert.equal(
        r.failedDuring + r.failedAfter,
        0,
        `process ${i + 1}: failed selections (ms from the SIGSTOP, error, nextAvailableAt from the SIGSTOP): ${JSON.stringify(r.errors)}`,
      )
    }
  })
})

test('the database up: selections at start-up and in a burst after a quiet spell', async (t) => {
  const server = await startNx(t)
  const quietMs = 3000
  const plan = { keys: KEYS, callers: 6, pauseMs: 2, quietMs, options: { ...SELECTION, mongodbDbName: 'gkm_burst' } }
  const child = startFixture(t, 'selector.js', plan, { MONGODB_URI: server.uri })
  assert.notEqual((await child.json('READY', 30000)).mode, 'in-memory')
  await sleep(quietMs + 3000)
  child.send('stop')
  const r = await child.json('RESULT', 30000)
  assert.equal((await child.waitExit(15000)).code, 0, child.output())
  const startUp = r.failedAt.filter((at) => at < r.burstAt)
  const burst = r.failedAt.filter((at) => at >= r.burstAt)
  const span = (times) => (times.length === 0 ? 'none' : `${times[0] - r.burstAt}..${times.at(-1) - r.burstAt} ms from the burst`)
  t.diagnostic(
    `${r.selections} selections; failed ${startUp.length} while quiet (1 caller, every 100 ms; ${span(startUp)}), ` +
      `${burst.length} in the burst (6 callers, 2 ms pauses, from ${r.burstAt % 500} ms into a slice; ${span(burst)}); ` +
      `first errors ${JSON.stringify(r.errors.map(([at, error]) => [at - r.burstAt, error]))}`,
  )
  await t.test('no selection fails', () => {
    assert.equal(r.failures, 0)
  })
})

/** A fresh manager over the same database and spill directory: writes what was spilled, and closes. */
async function nextStart(t, uri, dbName, spillDir) {
  const next = startFixture(
    t,
    'recorder.js',
    { keys: KEYS, count: 0, ratePerSec: 1, close: true, options: { mongodbDbName: dbName, spillDir } },
    { MONGODB_URI: uri },
  )
  await next.json('CLOSED', 30000)
  assert.equal((await next.waitExit(15000)).code, 0, next.output())
  return next
}

test('a database hung at shutdown: SIGTERM through the manager\'s exit hooks ends within closeTimeoutMs, spills, and the next start writes each call once', async (t) => {
  const server = await startNx(t)
  const dbName = 'gkm_hung_close'
  const spillDir = tempDir(t, 'spill')
  const count = 100
  const child = startFixture(
    t,
    'recorder.js',
    // Recorded after start-up's own write and far from the next flush: only the close can write them.
    { keys: KEYS, count, ratePerSec: 500, delayMs: 500, options: { flushIntervalMs: 60000, spillDir, mongodbDbName: dbName } },
    { MONGODB_URI: server.uri },
  )
  assert.notEqual((await child.json('READY', 30000)).mode, 'in-memory')
  await child.waitFor(new RegExp(`^DONE ${count}$`), 10000)
  const { usage } = await inspect(t, server.uri, dbName)
  assert.equal(await usage.countDocuments(), 0, 'nothing flushed before the close')

  server.hang()
  const signalled = Date.now()
  child.signal('SIGTERM')
  const exit = await child.waitExit(CLOSE_TIMEOUT_MS + 15000)
  const tookMs = exit.at - signalled
  await eventually(() => child.closed, 5000)
  const stats = await child.json('CLOSED', 1000)
  const spill = child.lines.find((l) => SPILL_LINE.test(l.text))
  t.diagnostic(`SIGTERM to exit with the database hung: ${tookMs} ms (closeTimeoutMs ${CLOSE_TIMEOUT_MS}); stats ${JSON.stringify(stats)}`)
  // The hooks raise the signal again once closed, so the process ends as it would have.
  assert.equal(exit.signal, 'SIGTERM', child.output())
  assert.ok(tookMs <= CLOSE_TIMEOUT_MS + CLOSE_SLACK_MS, `took ${tookMs} ms`)
  assert.ok(spill, `no spill line:\n${child.output()}`)
  const [, kept, file] = SPILL_LINE.exec(spill.text)
  const kinds = `${count} recorded calls, the state of ${KEYS.length} keys and the counts of ${KEYS.length} quota budgets`
  assert.equal(kept, kinds)
  assert.ok(file.startsWith(spillDir + path.sep) && fs.existsSync(file), file)
  assert.equal(stats.spilled, count)
  assert.equal(stats.dropped, 0)

  server.resume()
  const next = await nextStart(t, server.uri, dbName, spillDir)
  assert.ok(
    next.lines.some((l) => l.text === `✅ Wrote ${kinds} an earlier run kept in a spill file`),
    next.output(),
  )
  const stored = await storedCalls(usage)
  assert.deepEqual([stored.docs, stored.ids, stored.prefix], [count, count, true], JSON.stringify(stored))
  assert.deepEqual(filesUnder(spillDir), [], 'the spill file is gone')
  const { keys, db } = await inspect(t, server.uri, dbName)
  const rpd = (await keys.find().toArray()).reduce((n, d) => n + d.limits.rpd.current, 0)
  const budgets = await db.collection('api_key_budgets').find().toArray()
  const budgetRpd = budgets.reduce((n, d) => n + d.limits.rpd.current, 0)
  t.diagnostic(
    `after the next start: ${stored.docs} usage documents, ${stored.ids} distinct ids; api_keys RPD counts sum to ${rpd}, api_key_budgets' to ${budgetRpd}`,
  )
  await t.test('the keys\' counters and their quota budgets count the spilled calls too', () => {
    assert.equal(rpd, count)
    assert.equal(budgetRpd, count)
  })
})

test('a database hung at shutdown: SIGTERM to the bin `serve` ends within closeTimeoutMs, exit 0, and its change is spilled and written once', async (t) => {
  const server = await startNx(t)
  const dbName = 'gkm_hung_bin'
  const spillDir = tempDir(t, 'spill-bin')
  const bin = start(t, process.execPath, [BIN, 'serve'], {
    env: {
      GEMINI_API_KEYS: KEYS.join(','),
      HOST: '127.0.0.1',
      PORT: '0',
      MONGODB_URI: server.uri,
      MONGODB_DB_NAME: dbName,
      KEY_MANAGER_SPILL_DIR: spillDir,
      NODE_OPTIONS: `--require ${path.join(FIXTURES, 'long-flush.js')}`,
      TEST_FLUSH_INTERVAL_MS: '60000',
    },
  })
  const url = /listening on (http:\/\/\S+)\/api\/keys/.exec((await bin.waitFor(/listening on http/, 30000)).text)[1]
  const res = await fetch(`${url}/api/keys/disable/${mask(KEYS[1])}`, { method: 'POST' })
  assert.equal(res.status, 200, await res.text())
  const { admissions } = await inspect(t, server.uri, dbName)
  assert.equal(await admissions.countDocuments(), 0, 'nothing flushed before the close')

  server.hang()
  const signalled = Date.now()
  bin.signal('SIGTERM')
  const exit = await bin.waitExit(CLOSE_TIMEOUT_MS + 15000)
  const tookMs = exit.at - signalled
  await eventually(() => bin.closed, 5000)
  t.diagnostic(`bin serve, SIGTERM to exit with the database hung: ${tookMs} ms; ${bin.lines.find((l) => SPILL_LINE.test(l.text))?.text}`)
  assert.equal(exit.code, 0, bin.output())
  assert.ok(bin.lines.some((l) => l.text.startsWith('🛑 Shutting down')), bin.output())
  assert.ok(tookMs <= CLOSE_TIMEOUT_MS + CLOSE_SLACK_MS, `took ${tookMs} ms`)
  const spill = bin.lines.find((l) => SPILL_LINE.test(l.text))
  assert.ok(spill, `no spill line:\n${bin.output()}`)
  // Said by what was kept: no call was recorded, the disabled key's state and the decision were.
  assert.equal(SPILL_LINE.exec(spill.text)[1], 'the state of 1 key and 1 operator decision')
  assert.equal(filesUnder(spillDir).length, 1)

  server.resume()
  await nextStart(t, server.uri, dbName, spillDir)
  const stored = await admissions.find().toArray()
  assert.deepEqual(
    stored.map((d) => d.admission),
    ['disabled'],
    JSON.stringify(stored),
  )
  assert.deepEqual(filesUnder(spillDir), [], 'the spill file is gone')
})
