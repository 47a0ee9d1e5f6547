'use strict'

// The live dashboard (GET /api/keys/dashboard) in headless Chromium (Debian's, driven by
// playwright-core): it shows the numbers GET /status reports, follows them after traffic, loads
// nothing from outside and calls no admin endpoint. .ci/run installs chromium; outside CI the test
// is skipped when no chromium can be found, in CI (CI=true) it fails.

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')

const { PKG, fakeKey, mask } = require('./helpers')
const { ApiKeyManagerService } = require(PKG)

const CHROMIUM = [process.env.CHROMIUM_PATH, '/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => p && fs.existsSync(p))
const IN_CI = process.env.CI === 'true'
const skip = CHROMIUM === undefined && !IN_CI ? 'no chromium here (apt-get install chromium); CI installs it' : false

const LIMITS = { rpm: 30, rpd: 200, tpm: 100000 }
const TOKEN = 'dashboard-test-admin-token'
// The page refreshes every 1.5 s: a change shows within a few refreshes.
const SETTLE_MS = 8000

let browser
let page
let m
let server
let keys
const requests = []

before(async () => {
  if (skip) return
  assert.ok(CHROMIUM, 'chromium is missing in CI: .ci/run should have installed it (/usr/bin/chromium)')
  const { chromium } = require('playwright-core')
  keys = [fakeKey(901), fakeKey(902), fakeKey(903)]
  m = new ApiKeyManagerService({ keys, limits: LIMITS, quiet: true })
  // With an admin token set: the page must work without it.
  server = await m.serve({ host: '127.0.0.1', port: 0, adminToken: TOKEN })
  browser = await chromium.launch({ executablePath: CHROMIUM })
  page = await browser.newPage()
  page.on('request', (r) => requests.push(`${r.method()} ${r.url()}`))
})

after(async () => {
  if (browser) await browser.close()
  if (server) await server.close()
  if (m) await m.close()
})

/** What the page shows, read from its table. */
function readPage() {
  return page.$$eval('tr[data-key]', (rows) =>
    rows.map((row) => {
      const metric = (name) => {
        const td = row.querySelector(`[data-metric=${name}]`)
        return {
          current: Number(td.dataset.current),
          limit: Number(td.dataset.limit),
          text: td.querySelector('.figures').textContent,
          width: td.querySelector('.fill').style.width,
        }
      }
      const state = row.querySelector('[data-field=state]')
      const lastError = row.querySelector('[data-field=lastError]')
      return {
        apiKey: row.dataset.key,
        state: state.dataset.state,
        until: state.dataset.until,
        stateText: state.textContent,
        rpm: metric('rpm'),
        rpd: metric('rpd'),
        tpm: metric('tpm'),
        errorCount: Number(row.querySelector('[data-field=errors]').dataset.count),
        lastError: lastError.firstChild ? lastError.firstChild.textContent : '',
      }
    }),
  )
}

/** The figures of the page's rows that GET /status also reports, to compare the two. */
function figures(shown) {
  return shown.map(({ apiKey, state, until, rpm, rpd, tpm, errorCount, lastError }) => ({
    apiKey,
    state,
    until,
    rpm: { current: rpm.current, limit: rpm.limit },
    rpd: { current: rpd.current, limit: rpd.limit },
    tpm: { current: tpm.current, limit: tpm.limit },
    errorCount,
    lastError,
  }))
}

async function fromApi() {
  const res = await fetch(`${server.url}/api/keys/status`)
  const body = await res.json()
  assert.equal(body.success, true)
  return body.data.map((k) => ({
    apiKey: k.apiKey,
    state: k.state,
    until: k.stateUntil ?? '',
    rpm: { current: k.limits.rpm.current, limit: k.limits.rpm.limit },
    rpd: { current: k.limits.rpd.current, limit: k.limits.rpd.limit },
    tpm: { current: k.limits.tpm.current, limit: k.limits.tpm.limit },
    errorCount: k.errorCount,
    lastError: k.lastError ?? '',
  }))
}

/** Waits until the page shows what the API reports now; returns the page's reading. */
async function pageMatchesApi() {
  const deadline = Date.now() + SETTLE_MS
  let shown
  let api
  for (;;) {
    shown = await readPage()
    api = await fromApi()
    if (JSON.stringify(figures(shown)) === JSON.stringify(api)) return shown
    if (Date.now() > deadline) break
    await new Promise((resolve) => setTimeout(resolve, 200))
  }
  assert.deepEqual(figures(shown), api, 'the dashboard does not show what GET /status reports')
  return shown
}

/** The text and bar of every meter agree with its figures. */
function assertMetersDrawn(shown) {
  for (const row of shown) {
    for (const metric of ['rpm', 'rpd', 'tpm']) {
      const { current, limit, text, width } = row[metric]
      assert.equal(text.replace(/,/g, ''), `${current} / ${limit}`, `${row.apiKey} ${metric}`)
      const percent = Math.min(1, current / limit) * 100
      assert.ok(width.endsWith('%') && Math.abs(parseFloat(width) - percent) < 0.06, `${row.apiKey} ${metric}: bar ${width}, use ${percent}%`)
    }
  }
}

const total = (shown, metric) => shown.reduce((sum, row) => sum + row[metric].current, 0)

test('the dashboard shows every key, masked, with the figures GET /status reports', { skip }, async () => {
  await page.goto(`${server.url}/api/keys/dashboard`)
  assert.equal(await page.title(), 'Gemini key pool')
  await page.waitForSelector('#updated:not([data-refreshes="0"])')
  const shown = await pageMatchesApi()
  assert.deepEqual(
    shown.map((r) => r.apiKey),
    keys.map(mask),
  )
  assert.ok(shown.every((r) => r.state === 'active' && r.rpm.limit === LIMITS.rpm && r.tpm.limit === LIMITS.tpm))
  assertMetersDrawn(shown)
  const html = await page.content()
  for (const k of keys) assert.ok(!html.includes(k), 'a full key on the page')
})

test('after traffic the page follows: usage, a resting key and its time, the last error', { skip }, async () => {
  const before = await pageMatchesApi()
  const refreshes = Number(await page.getAttribute('#updated', 'data-refreshes'))
  for (let i = 0; i < 7; i++) {
    const r = await m.getBestAvailableKey()
    assert.equal(r.success, true, r.error)
    assert.equal((await m.recordUsage(r.data[0], 1234, true, undefined, 20)).success, true)
  }
  await m.recordUsage(keys[1], 0, false, '503 Service Unavailable: the model is overloaded <b>bold</b>', 50)
  await m.handleRateLimit(keys[2], 'RPM', { retryAfterMs: 30000 })

  const shown = await pageMatchesApi()
  assert.ok(Number(await page.getAttribute('#updated', 'data-refreshes')) > refreshes, 'the page did not refresh by itself')
  // A failed call on a key not handed out counts an error, not a request.
  assert.equal(total(shown, 'rpm'), total(before, 'rpm') + 7)
  assert.equal(total(shown, 'rpd'), total(before, 'rpd') + 7)
  assert.equal(total(shown, 'tpm'), total(before, 'tpm') + 7 * 1234)
  assertMetersDrawn(shown)

  const resting = shown.find((r) => r.apiKey === mask(keys[2]))
  assert.equal(resting.state, 'resting')
  assert.ok(new Date(resting.until).getTime() > Date.now(), resting.until)
  assert.match(resting.stateText, /^resting\s*until .+\(\d+ s\)$/)

  const failed = shown.find((r) => r.apiKey === mask(keys[1]))
  assert.equal(failed.errorCount, 1)
  // Shown as text, not as markup.
  assert.equal(failed.lastError, '503 Service Unavailable: the model is overloaded <b>bold</b>')
  assert.equal(await page.locator('[data-field=lastError] b').count(), 0)
  assert.match(await page.textContent('#counts'), /3 keys: 2 active, 1 resting, 0 deactivated/)
})

test('the page loads nothing from outside and calls no endpoint that changes state', { skip }, async () => {
  assert.ok(requests.length >= 3, requests.join('\n'))
  for (const r of requests) {
    assert.ok(r.startsWith(`GET ${server.url}/api/keys/`), `unexpected request: ${r}`)
    assert.match(r, /\/api\/keys\/(dashboard|status)$/, `unexpected request: ${r}`)
  }
})

test('budgets: one row per project and model, its keys counted once, with the figures GET /status reports', { skip }, async () => {
  const alpha = [fakeKey(911), fakeKey(912)]
  const own = fakeKey(913)
  const other = new ApiKeyManagerService({
    keys: [...alpha.map((apiKey) => ({ apiKey, project: 'alpha' })), own],
    limits: LIMITS,
    quiet: true,
  })
  const served = await other.serve({ host: '127.0.0.1', port: 0 })
  try {
    for (const model of [undefined, 'gemini-2.0-flash', 'gemini-2.0-flash']) {
      const r = await other.getBestAvailableKey({ model })
      assert.equal(r.success, true, r.error)
      assert.equal((await other.recordUsage(r.data[0], 100, true, undefined, 5, { model })).success, true)
    }
    await page.goto(`${served.url}/api/keys/dashboard`)
    const expected = async () => {
      const body = await (await fetch(`${served.url}/api/keys/status`)).json()
      const rows = new Map()
      for (const k of body.data) {
        const project = k.project ?? `own: ${k.apiKey}`
        for (const [model, b] of Object.entries(k.models)) {
          const row = rows.get(`${project} ${model}`) ?? { project, model, keys: 0, state: b.state, rpm: b.rpm.current, tpm: b.tpm.current, rpmLimit: b.rpm.limit }
          row.keys += 1
          rows.set(`${project} ${model}`, row)
        }
      }
      return [...rows.values()].sort((a, b) => `${a.project} ${a.model}`.localeCompare(`${b.project} ${b.model}`))
    }
    const shownBudgets = () =>
      page.$$eval('tr[data-budget]', (rows) =>
        rows
          .map((row) => ({
            project: row.dataset.project,
            model: row.dataset.model,
            keys: Number(row.querySelector('[data-field=keys]').dataset.count),
            state: row.querySelector('[data-field=state]').dataset.state,
            rpm: Number(row.querySelector('[data-metric=rpm]').dataset.current),
            tpm: Number(row.querySelector('[data-metric=tpm]').dataset.current),
            rpmLimit: Number(row.querySelector('[data-metric=rpm]').dataset.limit),
          }))
          .sort((a, b) => `${a.project} ${a.model}`.localeCompare(`${b.project} ${b.model}`)),
      )
    const deadline = Date.now() + SETTLE_MS
    let shown
    let api
    do {
      await new Promise((resolve) => setTimeout(resolve, 200))
      shown = await shownBudgets()
      api = await expected()
    } while (JSON.stringify(shown) !== JSON.stringify(api) && Date.now() < deadline)
    assert.deepEqual(shown, api)
    // Both projects met both models; alpha's two keys share each of its budgets.
    const alphaRows = shown.filter((r) => r.project === 'alpha')
    assert.deepEqual(alphaRows.map((r) => r.keys), [2, 2])
    assert.equal(shown.length, 4)
    assert.equal(shown.reduce((sum, r) => sum + r.rpm, 0), 3, 'three calls, each counted in one budget')
    assert.ok(shown.some((r) => r.model === 'gemini-2.0-flash' && r.rpmLimit === 15), 'the table\'s limit for gemini-2.0-flash')
  } finally {
    await served.close()
    await other.close()
  }
})
