'use strict'

// Issue 11 point 7, faults 1 and 2: a manager SIGKILLed mid-run loses at most what it recorded
// since its last flush (plus the batch being written), and a database killed with -9 and started
// again (over the same file) ends up with every call recorded across the outage, each once.

const test = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')
const { KEYS, eventually, inspect, sleep, startFixture, startNx, storedCalls, tempDir } = require('./support')

// High enough that no limit is ever reached: these tests are about persistence, not quotas.
const LIMITS = { rpm: 1000000, rpd: 10000000, tpm: 1e12 }

test('a SIGKILLed manager loses at most what it recorded in its last flush interval or two', async (t) => {
  const server = await startNx(t)
  const flushIntervalMs = 200
  const ratePerSec = 200
  const figures = []
  // Three kills, each at another point of the flush cycle.
  for (const [run, recordFor] of [3000, 3070, 3140].entries()) {
    const dbName = `gkm_sigkill_${run}`
    const child = startFixture(
      t,
      'recorder.js',
      { keys: KEYS, ratePerSec, options: { limits: LIMITS, flushIntervalMs, mongodbDbName: dbName } },
      { MONGODB_URI: server.uri },
    )
    const ready = await child.json('READY', 30000)
    assert.notEqual(ready.mode, 'in-memory', 'connected to MongoDB')
    const first = await child.waitFor(/^REC 1$/, 10000)
    await sleep(Math.max(0, first.at + recordFor - Date.now()))
    child.signal('SIGKILL')
    const killedAt = Date.now()
    const exit = await child.waitExit(10000)
    assert.equal(exit.signal, 'SIGKILL')
    await eventually(() => child.closed, 5000)

    const recs = child.lines.filter((l) => l.text.startsWith('REC '))
    const recorded = recs.length
    const { usage } = await inspect(t, server.uri, dbName)
    const stored = await storedCalls(usage)
    assert.equal(stored.docs, stored.ids, 'no call stored twice')
    assert.ok(stored.prefix, `the calls stored are the first ones, without a hole: ${stored.numbers.slice(0, 5)}...`)
    // A call whose REC line the kill cut off may have been stored: one at most.
    assert.ok(stored.docs <= recorded + 1, `${stored.docs} stored, ${recorded} recorded`)
    const lost = Math.max(0, recorded - stored.docs)
    // How long before the kill the first lost call was recorded.
    const lostSpanMs = lost === 0 ? 0 : killedAt - recs[stored.docs].at
    figures.push({ recorded, stored: stored.docs, lost, lostSpanMs })
    // At most the interval since the last flush plus the batch that flush was writing, with room
    // for a noisy machine.
    assert.ok(lostSpanMs <= 2 * flushIntervalMs + 1000, `lost the calls of the last ${lostSpanMs} ms: ${JSON.stringify(figures)}`)
  }
  t.diagnostic(
    `flushIntervalMs ${flushIntervalMs}, ${ratePerSec} calls/s (${(ratePerSec * flushIntervalMs) / 1000} a flush interval): ` +
      figures.map((f) => `recorded ${f.recorded}, stored ${f.stored}, lost ${f.lost} (the last ${f.lostSpanMs} ms)`).join('; '),
  )
})

test('a database killed with -9 and restarted gets every call recorded across the outage, each once', async (t) => {
  const dir = tempDir(t, 'dbkill')
  const file = path.join(dir, 'usage.db')
  let server = await startNx(t, { db: file, dir })
  const dbName = 'gkm_dbkill'
  const child = startFixture(
    t,
    'recorder.js',
    {
      keys: KEYS,
      ratePerSec: 100,
      close: true,
      options: { limits: LIMITS, flushIntervalMs: 200, mongoRetryIntervalMs: 500, mongodbDbName: dbName },
    },
    { MONGODB_URI: server.uri },
  )
  const ready = await child.json('READY', 30000)
  assert.notEqual(ready.mode, 'in-memory', 'connected to MongoDB')
  const count = () => child.lines.filter((l) => l.text.startsWith('REC ')).length
  assert.ok(await eventually(() => count() >= 150, 20000), 'recording')
  const { usage: before } = await inspect(t, server.uri, dbName)
  assert.ok(await eventually(async () => (await before.countDocuments()) > 0, 5000), 'written before the kill')

  await server.kill9()
  const killedAt = Date.now()
  const atKill = count()
  await sleep(2000)
  const restartedAt = Date.now()
  const duringOutage = count() - atKill
  const seen = child.lines.length
  server = await startNx(t, { port: server.port, db: file, dir })
  // The writer says so when a write works again.
  const back = await child.waitFor(/MongoDB connection established/, 30000, seen)
  await sleep(1000)
  child.send('stop')
  const stats = await child.json('CLOSED', 30000)
  const exit = await child.waitExit(15000)
  assert.equal(exit.code, 0, child.output())
  const recorded = Number((await child.waitFor(/^DONE \d+$/, 1000)).text.slice(5))
  assert.equal(recorded, count())

  const { usage } = await inspect(t, server.uri, dbName)
  const stored = await storedCalls(usage)
  assert.equal(stored.docs, recorded, `${stored.docs} documents for ${recorded} calls`)
  assert.equal(stored.ids, recorded, 'each call stored once')
  assert.ok(stored.prefix, 'every call 1..n is there')
  assert.deepEqual([stats.queued, stats.pending, stats.dropped, stats.spilled], [0, 0, 0, 0], JSON.stringify(stats))
  t.diagnostic(
    `recorded ${recorded} (${atKill} before the kill, ${duringOutage} in the ${restartedAt - killedAt} ms down), ` +
      `stored ${stored.docs} documents, ${stored.ids} distinct ids; writes resumed ${back.at - restartedAt} ms after the restart`,
  )
})
