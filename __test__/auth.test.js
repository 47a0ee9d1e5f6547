'use strict'

// Admin auth (issue 6, point 4) and key references in URLs (point 5), over real sockets: the Rust
// server (`serve`), the Express adapter (`keyRoutes`) and the CLI, which share one Rust route table
// and so one guard. Also: access logs never print a full key.

const { describe, test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')
const { spawn } = require('node:child_process')

const express = require('express')

const { PKG, fakeKey, mask, cleanEnv } = require('./helpers')
const { ApiKeyManagerService, keyRoutes } = require(PKG)

const CLI = path.join(PKG, 'bin', 'gemini-key-manager.js')
const LIMITS = { rpm: 30, rpd: 200, tpm: 1000000 }
const TOKEN = 'test-admin-token-0123456789abcdef'
const ADMIN = [
  ['POST', '/rotate'],
  ['POST', '/refresh-cache'],
  ['POST', '/reactivate/KEY'],
  ['POST', '/reset-limits'],
]
const READ = [
  ['GET', '/status'],
  ['GET', '/best'],
  ['GET', '/rate-limit/KEY'],
  ['GET', '/usage-stats'],
  ['GET', '/dashboard'],
]

function newKeys(from, n) {
  return Array.from({ length: n }, (_, i) => fakeKey(from + i))
}

async function call(base, method, urlPath, headers = {}) {
  const res = await fetch(base + urlPath, { method, headers })
  const text = await res.text()
  return { status: res.status, headers: res.headers, text, json: res.headers.get('content-type')?.startsWith('application/json') ? JSON.parse(text) : undefined }
}

function assertUnauthorized(r, where) {
  assert.equal(r.status, 401, `${where}: ${r.text}`)
  assert.equal(r.json.success, false, where)
  assert.equal(r.json.error, 'Unauthorized', where)
  assert.equal(typeof r.json.message, 'string', where)
  assert.match(r.headers.get('www-authenticate') ?? '', /^Bearer /, where)
}

/** The admin and read endpoints of a server at `base`, checked against `token`. */
async function checkGuard(base, keys, token) {
  const at = (p) => p.replace('KEY', mask(keys[0]))
  for (const [method, p] of ADMIN) {
    assertUnauthorized(await call(base, method, at(p)), `${method} ${p} without a token`)
    assertUnauthorized(await call(base, method, at(p), { authorization: `Bearer ${token}x` }), `${method} ${p} with a wrong token`)
    assertUnauthorized(await call(base, method, at(p), { authorization: `Basic ${Buffer.from(`admin:${token}`).toString('base64')}` }), `${method} ${p} with Basic auth`)
    assertUnauthorized(await call(base, method, at(p), { authorization: token }), `${method} ${p} with no scheme`)
    const ok = await call(base, method, at(p), { authorization: `Bearer ${token}` })
    assert.equal(ok.status, 200, `${method} ${p} with the token: ${ok.text}`)
  }
  for (const [method, p] of READ) {
    const r = await call(base, method, at(p))
    assert.equal(r.status, 200, `${method} ${p} needs no token: ${r.text}`)
  }
}

describe('Rust server: admin auth', () => {
  test('with adminToken, the endpoints that change state want it; reading does not', async (t) => {
    const keys = newKeys(801, 2)
    const m = new ApiKeyManagerService({ keys, limits: LIMITS, quiet: true })
    const server = await m.serve({ host: '127.0.0.1', port: 0, adminToken: TOKEN })
    t.after(async () => {
      await server.close()
      await m.close()
    })
    await checkGuard(`${server.url}/api/keys`, keys, TOKEN)
  })

  test('a refused reset-limits or reactivate changes nothing', async (t) => {
    const keys = newKeys(811, 1)
    const m = new ApiKeyManagerService({ keys, limits: LIMITS, quiet: true })
    const server = await m.serve({ port: 0, adminToken: TOKEN })
    t.after(async () => {
      await server.close()
      await m.close()
    })
    await m.recordUsage(keys[0], 0, false, '[400 Bad Request] API key not valid. API_KEY_INVALID')
    await m.recordUsage(keys[0], 10, true)
    const base = `${server.url}/api/keys`
    assertUnauthorized(await call(base, 'POST', '/reset-limits'), 'reset-limits')
    assertUnauthorized(await call(base, 'POST', `/reactivate/${keys[0]}`), 'reactivate')
    const status = (await call(base, 'GET', '/status')).json.data[0]
    assert.equal(status.limits.tpm.current, 10)
    assert.equal(status.state, 'deactivated')
  })

  test('without a token (and without KEY_MANAGER_ADMIN_TOKEN) every endpoint stays open, as in the old service', async (t) => {
    assert.equal(process.env.KEY_MANAGER_ADMIN_TOKEN, undefined)
    const keys = newKeys(821, 1)
    const m = new ApiKeyManagerService({ keys, limits: LIMITS, quiet: true })
    const server = await m.serve({ port: 0 })
    t.after(async () => {
      await server.close()
      await m.close()
    })
    assert.equal((await call(`${server.url}/api/keys`, 'POST', '/reset-limits')).status, 200)
  })

  test('refuses a non-loopback address without a token unless allowInsecure; listens with a token', async () => {
    const keys = newKeys(831, 1)
    const m = new ApiKeyManagerService({ keys, limits: LIMITS, quiet: true })
    for (const host of ['0.0.0.0', '::']) {
      await assert.rejects(m.serve({ host, port: 0 }), (e) => {
        assert.match(e.message, /refusing to listen on .* without an admin token/)
        assert.match(e.message, /KEY_MANAGER_ADMIN_TOKEN/)
        assert.match(e.message, /allowInsecure/)
        return true
      })
    }
    for (const options of [{ adminToken: TOKEN }, { allowInsecure: true }]) {
      const server = await m.serve({ host: '0.0.0.0', port: 0, ...options })
      // Reached through loopback only: nothing here sends traffic off this machine.
      const r = await call(`http://127.0.0.1:${server.port}/api/keys`, 'GET', '/status')
      assert.equal(r.status, 200)
      await server.close()
    }
    for (const host of ['127.0.0.1', '::1']) {
      const server = await m.serve({ host, port: 0 })
      await server.close()
    }
    await m.close()
  })

  test('an unusable token or allowInsecure is refused at serve()', async () => {
    const keys = newKeys(841, 1)
    const m = new ApiKeyManagerService({ keys, limits: LIMITS, quiet: true })
    for (const adminToken of ['', 'two words', 'tab\there']) {
      await assert.rejects(m.serve({ port: 0, adminToken }), /adminToken must be a non-empty string/)
    }
    await assert.rejects(m.serve({ port: 0, adminToken: 42 }), /adminToken must be a string/)
    await assert.rejects(m.serve({ port: 0, allowInsecure: 'yes' }), /allowInsecure must be a boolean/)
    await m.close()
  })
})

describe('Express adapter: the same guard', () => {
  let server
  let keys
  let m
  before(async () => {
    keys = newKeys(851, 2)
    m = new ApiKeyManagerService({ keys, limits: LIMITS, quiet: true })
    const app = express()
    app.use('/api/keys', keyRoutes(m, { adminToken: TOKEN }))
    server = await new Promise((resolve) => {
      const s = app.listen(0, '127.0.0.1', () => resolve(s))
    })
  })
  after(async () => {
    await new Promise((resolve) => server.close(resolve))
    await m.close()
  })

  test('keyRoutes(manager, { adminToken }) guards the admin endpoints as serve() does', async () => {
    await checkGuard(`http://127.0.0.1:${server.address().port}/api/keys`, keys, TOKEN)
  })

  test('keyRoutes reads KEY_MANAGER_ADMIN_TOKEN when no token is given', async (t) => {
    const app = express()
    process.env.KEY_MANAGER_ADMIN_TOKEN = `${TOKEN}-env\n`
    t.after(() => delete process.env.KEY_MANAGER_ADMIN_TOKEN)
    app.use('/api/keys', keyRoutes(m))
    const s = await new Promise((resolve) => {
      const x = app.listen(0, '127.0.0.1', () => resolve(x))
    })
    t.after(() => new Promise((resolve) => s.close(resolve)))
    const base = `http://127.0.0.1:${s.address().port}/api/keys`
    assertUnauthorized(await call(base, 'POST', '/refresh-cache'), 'no token')
    assertUnauthorized(await call(base, 'POST', '/refresh-cache', { authorization: `Bearer ${TOKEN}` }), 'the other token')
    assert.equal((await call(base, 'POST', '/refresh-cache', { authorization: `Bearer ${TOKEN}-env` })).status, 200)
  })

  test('an unusable token: keyRoutes throws on a non-string, and answers 500 JSON for an empty one', async (t) => {
    assert.throws(() => keyRoutes(m, { adminToken: 42 }), /adminToken must be a string/)
    const app = express()
    app.use('/api/keys', keyRoutes(m, { adminToken: '' }))
    const s = await new Promise((resolve) => {
      const x = app.listen(0, '127.0.0.1', () => resolve(x))
    })
    t.after(() => new Promise((resolve) => s.close(resolve)))
    const r = await call(`http://127.0.0.1:${s.address().port}/api/keys`, 'GET', '/status')
    assert.equal(r.status, 500)
    assert.match(r.json.error, /adminToken must be a non-empty string/)
  })
})

// ------------------------------------------------------------------------------------------------

/** The CLI in a child process; resolves once it listens, with its base URL and its output so far. */
function startCli(t, args, env) {
  const child = spawn(process.execPath, [CLI, 'serve', '--port', '0', ...args], { env: cleanEnv(env), stdio: ['ignore', 'pipe', 'pipe'] })
  const out = { stdout: '', stderr: '' }
  child.stdout.setEncoding('utf8').on('data', (d) => (out.stdout += d))
  child.stderr.setEncoding('utf8').on('data', (d) => (out.stderr += d))
  const exited = new Promise((resolve) => child.on('close', (code) => resolve(code)))
  t.after(() => {
    if (child.exitCode === null) child.kill('SIGKILL')
    return exited
  })
  const listening = new Promise((resolve, reject) => {
    child.stdout.on('data', () => {
      const m = out.stdout.match(/listening on (http:\/\/\S+)\/api\/keys/)
      if (m) resolve(m[1])
    })
    exited.then((code) => reject(new Error(`CLI exited ${code}\n${out.stdout}\n${out.stderr}`)))
  })
  return { child, out, exited, listening }
}

describe('CLI', () => {
  test('KEY_MANAGER_ADMIN_TOKEN guards the admin endpoints', async (t) => {
    const keys = newKeys(861, 2)
    const cli = startCli(t, [], { GEMINI_API_KEYS: keys.join(','), KEY_MANAGER_ADMIN_TOKEN: TOKEN })
    const url = await cli.listening
    await checkGuard(`${url}/api/keys`, keys, TOKEN)
  })

  test('--host 0.0.0.0 without a token exits 1 with the reason; --allow-insecure listens', async (t) => {
    const keys = newKeys(871, 1)
    const refused = startCli(t, ['--host', '0.0.0.0'], { GEMINI_API_KEYS: keys.join(',') })
    await assert.rejects(refused.listening)
    assert.equal(await refused.exited, 1)
    assert.match(refused.out.stderr, /refusing to listen on 0\.0\.0\.0:0 without an admin token/)
    const allowed = startCli(t, ['--host', '0.0.0.0', '--allow-insecure'], { GEMINI_API_KEYS: keys.join(',') })
    assert.match(await allowed.listening, /^http:\/\/0\.0\.0\.0:\d+$/)
    const viaEnv = startCli(t, ['--host', '0.0.0.0'], { GEMINI_API_KEYS: keys.join(','), KEY_MANAGER_ALLOW_INSECURE: '1' })
    await viaEnv.listening
  })

  test('the access log never prints a full key, whatever the request carries', async (t) => {
    const keys = newKeys(881, 2)
    const cli = startCli(t, ['--access-log'], { GEMINI_API_KEYS: keys.join(',') })
    const base = `${await cli.listening}/api/keys`
    const encoded = [...keys[1]].map((c) => `%${c.charCodeAt(0).toString(16).padStart(2, '0')}`).join('')
    const requests = [
      ['GET', `/rate-limit/${keys[0]}`],
      ['GET', `/rate-limit/${encoded}`],
      ['POST', `/reactivate/${keys[1]}?key=${keys[0]}`],
      ['GET', `/${keys[0]}/nowhere`],
      ['GET', `/status?key=${keys[1]}`],
      ['GET', `/rate-limit/${keys[0]}x`],
      [keys[0], '/status'],
    ]
    for (const [method, p] of requests) {
      const res = await fetch(base + p, { method })
      const text = await res.text()
      for (const k of keys) assert.ok(!text.includes(k), `${method} ${p}: a full key in the response ${text}`)
    }
    // Every request has its line once the last one is answered, bar the lag of the log's wake-up on the JS thread.
    const deadline = Date.now() + 5000
    while (cli.out.stdout.split('\n').filter((l) => / \d{3} \d+\.\d{3}ms$/.test(l)).length < requests.length && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
    const lines = cli.out.stdout.split('\n').filter((l) => / \d{3} \d+\.\d{3}ms$/.test(l))
    assert.equal(lines.length, requests.length, cli.out.stdout)
    for (const k of keys) assert.ok(!cli.out.stdout.includes(k) && !cli.out.stderr.includes(k), `a full key in the log:\n${cli.out.stdout}`)
    assert.ok(lines.some((l) => l.includes(`/api/keys/rate-limit/${mask(keys[0])} 200`)), cli.out.stdout)
    assert.ok(lines.some((l) => l.includes(`/api/keys/rate-limit/${mask(keys[1])} 200`)), cli.out.stdout)
  })
})

describe('key references in URLs', () => {
  test('full and masked forms name a key; a mask two keys share is a 409 naming neither', async (t) => {
    // Same first 8 and last 4 characters: one mask for both.
    const twins = ['AIzaSyTWINa1111111111111111111111110000', 'AIzaSyTWINb2222222222222222222222220000']
    const single = fakeKey(891)
    const m = new ApiKeyManagerService({ keys: [...twins, single], limits: LIMITS, quiet: true })
    const server = await m.serve({ port: 0 })
    t.after(async () => {
      await server.close()
      await m.close()
    })
    const base = `${server.url}/api/keys`
    for (const [method, route] of [['GET', '/rate-limit/'], ['POST', '/reactivate/']]) {
      const ambiguous = await call(base, method, route + mask(twins[0]))
      assert.equal(ambiguous.status, 409, ambiguous.text)
      assert.equal(ambiguous.json.success, false)
      assert.equal(ambiguous.json.error, 'Ambiguous API key')
      for (const k of twins) assert.ok(!ambiguous.text.includes(k))
      for (const ref of [twins[0], twins[1], single, mask(single), encodeURIComponent(mask(single))]) {
        const r = await call(base, method, route + ref)
        assert.equal(r.status, 200, `${method} ${route}${ref}: ${r.text}`)
      }
      assert.equal((await call(base, method, `${route}AIzaSyNO...0000`)).status, 404)
    }
  })
})
