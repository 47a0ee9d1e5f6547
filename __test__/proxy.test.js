'use strict'

// Issue 15: the Gemini proxy. Any SDK gets the pool's keys by changing only its base URL: the
// official @google/genai, LangChain's @langchain/google-genai, the openai SDK on Google's
// OpenAI-compatible paths, and curl, against the fake Gemini. The client presents a proxy token
// where it would put a key; the proxy picks the pool key, waits, retries and counts, and neither
// the token upstream nor a pool key back to the client ever shows.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { spawn, execFile, execFileSync } = require('node:child_process')
const { PKG, fakeKey, statusOf, cleanEnv } = require('./helpers')
const { startFakeGemini } = require('./fixtures/fake-gemini')

const { ApiKeyManagerService } = require(PKG)
const { GoogleGenAI } = require('@google/genai')
const { ChatGoogleGenerativeAI, GoogleGenerativeAIEmbeddings } = require('@langchain/google-genai')
const { OpenAI } = require('openai')

const MODEL = 'gemini-2.0-flash'
const EMBEDDING = 'gemini-embedding-001'
const TOKEN = 'proxy-token-for-tests-0001'
const LIMITS = { rpm: 1000, rpd: 10_000, tpm: 10_000_000 }
const keysOf = (n, from = 1) => Array.from({ length: n }, (_, i) => fakeKey(from + i))
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/**
 * A manager over `keys` serving the proxy on loopback with `serve` options (proxy tokens [TOKEN]
 * unless given), sending to `fake` (a new fake Gemini unless given); all closed after.
 */
async function setup(t, { keys = keysOf(2), fake, fakeOptions = {}, serve = {}, manager = {} } = {}) {
  const gemini = fake ?? (await startFakeGemini({ limits: LIMITS, ...fakeOptions }))
  process.env.GEMINI_BASE_URL = gemini.url
  const m = new ApiKeyManagerService({ keys, limits: LIMITS, model: MODEL, quiet: true, routeRequests: false, ...manager })
  await m.initialize()
  const server = await m.serve({ host: '127.0.0.1', port: 0, proxyTokens: [TOKEN], ...serve })
  t.after(async () => {
    await server.close()
    await m.close()
    delete process.env.GEMINI_BASE_URL
    await gemini.close()
  })
  return { m, keys, gemini, server }
}

/** Every request the fake saw went with a pool key in its header and carried no token or key elsewhere. */
function assertOnlyPoolKeysUpstream(gemini, keys) {
  const seen = gemini.requestsSeen()
  assert.ok(seen.length > 0)
  for (const r of seen) {
    assert.ok(keys.includes(r.apiKey), `${r.method} ${r.path} went with ${r.apiKey}`)
    assert.equal(r.authorization, undefined, `${r.path}: authorization forwarded`)
    assert.equal(r.query.includes('key='), false, `${r.path}${r.query}: a key in the URL`)
    assert.equal(JSON.stringify(r.headers).includes(TOKEN), false, `${r.path}: the client's token forwarded`)
  }
}

/** The tokens the pool counted over `keys` for the default model. */
async function countedTokens(m, keys) {
  let total = 0
  for (const k of keys) total += (await statusOf(m, k)).limits.tpm.current
  return total
}

test('@google/genai with only its base URL changed: generate, stream, count tokens, embed, list models', async (t) => {
  const { m, keys, gemini, server } = await setup(t)
  const ai = new GoogleGenAI({ apiKey: TOKEN, httpOptions: { baseUrl: server.url } })
  const generated = await ai.models.generateContent({ model: MODEL, contents: 'Hello' })
  assert.match(generated.text, /^Fake answer/)
  let streamed = ''
  let lastUsage
  for await (const chunk of await ai.models.generateContentStream({ model: MODEL, contents: 'Hello' })) {
    streamed += chunk.text ?? ''
    lastUsage = chunk.usageMetadata
  }
  assert.match(streamed, /^Fake answer #\d+ from gemini-2.0-flash\.$/)
  const counted = await ai.models.countTokens({ model: MODEL, contents: 'Hello there' })
  assert.equal(typeof counted.totalTokens, 'number')
  const embedded = await ai.models.embedContent({ model: EMBEDDING, contents: ['one', 'two'] })
  assert.equal(embedded.embeddings.length, 2)
  const listed = await ai.models.list()
  const names = []
  for await (const model of listed) names.push(model.name)
  assert.ok(names.includes(`models/${MODEL}`), names.join())
  assert.equal((await ai.models.get({ model: MODEL })).name, `models/${MODEL}`)

  // Generation is counted as Gemini counted it, the stream from its last chunk; the reads and
  // the token count spent nothing.
  const generations = gemini.acceptedFor({ model: MODEL })
  assert.equal(generations.length, 2)
  assert.equal(lastUsage.totalTokenCount, generations[1].tokens)
  assert.equal(await countedTokens(m, keys), generations[0].tokens + generations[1].tokens)
  let requests = 0
  for (const k of keys) requests += (await statusOf(m, k)).limits.rpm.current
  assert.equal(requests, 2)
  assertOnlyPoolKeysUpstream(gemini, keys)
})

test('@langchain/google-genai with baseUrl: invoke, stream, embed a query and documents', async (t) => {
  const { m, keys, gemini, server } = await setup(t)
  const chat = new ChatGoogleGenerativeAI({ apiKey: TOKEN, model: MODEL, baseUrl: server.url, maxRetries: 0 })
  assert.match(String((await chat.invoke('Hello')).content), /^Fake answer/)
  let text = ''
  for await (const chunk of await chat.stream('Hello')) text += chunk.content
  assert.match(text, /^Fake answer/)
  const embeddings = new GoogleGenerativeAIEmbeddings({ apiKey: TOKEN, model: EMBEDDING, baseUrl: server.url, maxRetries: 0 })
  assert.equal((await embeddings.embedQuery('one')).length, 8)
  assert.equal((await embeddings.embedDocuments(['one', 'two'])).length, 2)
  const kinds = gemini.acceptedFor({}).map((e) => e.kind)
  assert.deepEqual(kinds, ['generateContent', 'streamGenerateContent', 'embedContent', 'batchEmbedContents'])
  assert.equal(await countedTokens(m, keys), gemini.acceptedFor({ model: MODEL }).reduce((n, e) => n + e.tokens, 0))
  assertOnlyPoolKeysUpstream(gemini, keys)
})

test('the openai SDK on /v1beta/openai: chat plain and streamed, embeddings, models; usage counted', async (t) => {
  const { m, keys, gemini, server } = await setup(t)
  const client = new OpenAI({ apiKey: TOKEN, baseURL: `${server.url}/v1beta/openai`, maxRetries: 0 })
  const chat = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Hello' }] })
  assert.match(chat.choices[0].message.content, /^Fake answer/)
  let text = ''
  let usage
  const stream = await client.chat.completions.create({
    model: MODEL,
    messages: [{ role: 'user', content: 'Hello' }],
    stream: true,
    stream_options: { include_usage: true },
  })
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? ''
    if (chunk.usage) usage = chunk.usage
  }
  assert.match(text, /^Fake answer #\d+ from gemini-2.0-flash\.$/)
  const embedded = await client.embeddings.create({ model: EMBEDDING, input: ['one', 'two'] })
  assert.equal(embedded.data.length, 2)
  const models = []
  for await (const model of client.models.list()) models.push(model.id)
  assert.ok(models.includes(`models/${MODEL}`))

  // Counted on the model the body named, from the answers' `usage`.
  const chats = gemini.acceptedFor({ model: MODEL })
  assert.equal(chats.length, 2)
  assert.equal(usage.total_tokens, chats[1].tokens)
  assert.equal(chat.usage.total_tokens, chats[0].tokens)
  assert.equal(await countedTokens(m, keys), chats[0].tokens + chats[1].tokens)
  assert.equal(gemini.acceptedFor({ model: EMBEDDING }).length, 1)
  assertOnlyPoolKeysUpstream(gemini, keys)
})

test('model reads and countTokens go on any key in service, every minute spent or not; with none in service a 503', async (t) => {
  const limits = { rpm: 1, rpd: 10_000, tpm: 10_000_000 }
  const { m, keys, gemini, server } = await setup(t, { manager: { limits } })
  const ai = new GoogleGenAI({ apiKey: TOKEN, httpOptions: { baseUrl: server.url } })
  for (let i = 0; i < keys.length; i++) await ai.models.generateContent({ model: MODEL, contents: 'Hello' })
  for (const k of keys) assert.equal((await statusOf(m, k)).limits.rpm.current, 1)
  const before = gemini.requestsSeen().length
  const names = []
  for await (const model of await ai.models.list()) names.push(model.name)
  assert.ok(names.includes(`models/${MODEL}`))
  assert.equal((await ai.models.get({ model: MODEL })).name, `models/${MODEL}`)
  assert.equal(typeof (await ai.models.countTokens({ model: MODEL, contents: 'Hello' })).totalTokens, 'number')
  const openai = new OpenAI({ apiKey: TOKEN, baseURL: `${server.url}/v1beta/openai`, maxRetries: 0 })
  const listed = []
  for await (const model of openai.models.list()) listed.push(model.id)
  assert.ok(listed.includes(`models/${MODEL}`))
  assert.equal(gemini.requestsSeen().length, before + 4)
  // Counted nowhere: the minutes are as they were.
  for (const k of keys) assert.equal((await statusOf(m, k)).limits.rpm.current, 1)

  // One key disabled, the other refused by Gemini: nothing in service, nothing sent.
  await m.disableKey(keys[0])
  await m.recordUsage(keys[1], 0, false, 'API_KEY_INVALID')
  const r = await fetch(`${server.url}/v1beta/models`, { headers: { 'x-goog-api-key': TOKEN } })
  assert.equal(r.status, 503)
  const answer = await r.json()
  assert.equal(answer.error.status, 'UNAVAILABLE')
  assert.match(answer.error.message, /in service/)
  assert.equal(gemini.requestsSeen().length, before + 4)
})

test('a wrong or missing token is a 401 in Gemini shape and nothing goes upstream; other paths are 404s', async (t) => {
  const { gemini, server } = await setup(t)
  const body = JSON.stringify({ contents: [{ parts: [{ text: 'Hi' }] }] })
  const target = `${server.url}/v1beta/models/${MODEL}:generateContent`
  for (const headers of [{}, { 'x-goog-api-key': 'wrong' }, { authorization: 'Bearer wrong' }, { 'x-goog-api-key': fakeKey(1) }]) {
    const r = await fetch(target, { method: 'POST', headers, body })
    assert.equal(r.status, 401)
    const answer = await r.json()
    assert.equal(answer.error.code, 401)
    assert.equal(answer.error.status, 'UNAUTHENTICATED')
  }
  assert.equal((await fetch(`${target}?key=wrong`, { method: 'POST', body })).status, 401)
  const ai = new GoogleGenAI({ apiKey: 'not-the-token', httpOptions: { baseUrl: server.url } })
  await assert.rejects(ai.models.generateContent({ model: MODEL, contents: 'Hello' }), /401/)
  // Not an open proxy: paths that are no model method are never forwarded.
  for (const [method, p] of [
    ['GET', '/v1beta/files'],
    ['POST', '/v1beta/models/m:deleteEverything'],
    ['POST', '/v1beta/tunedModels/x:generateContent'],
    ['GET', '/v1beta/openai/files'],
    ['POST', '/v1/openai/chat/completions'],
  ]) {
    const r = await fetch(`${server.url}${p}`, { method, headers: { 'x-goog-api-key': TOKEN }, body: method === 'POST' ? body : undefined })
    assert.equal(r.status, 404, `${method} ${p}`)
    assert.equal((await r.json()).error.status, 'NOT_FOUND')
  }
  assert.equal(gemini.requestsSeen().length, 0)
})

test('without tokens the proxy is off; proxyOpen opens it on loopback only', async (t) => {
  const keys = keysOf(1, 20)
  const gemini = await startFakeGemini({ limits: LIMITS })
  process.env.GEMINI_BASE_URL = gemini.url
  const m = new ApiKeyManagerService({ keys, limits: LIMITS, model: MODEL, quiet: true, routeRequests: false })
  await m.initialize()
  t.after(async () => {
    await m.close()
    delete process.env.GEMINI_BASE_URL
    await gemini.close()
  })
  const off = await m.serve({ host: '127.0.0.1', port: 0 })
  assert.equal(off.proxy, false)
  assert.equal((await fetch(`${off.url}/v1beta/models`)).status, 404)
  await off.close()
  const open = await m.serve({ host: '127.0.0.1', port: 0, proxyOpen: true })
  assert.equal(open.proxy, true)
  const r = await fetch(`${open.url}/v1beta/models/${MODEL}:generateContent`, {
    method: 'POST',
    body: JSON.stringify({ contents: [{ parts: [{ text: 'Hi' }] }] }),
  })
  assert.equal(r.status, 200)
  await open.close()
  await assert.rejects(m.serve({ host: '0.0.0.0', port: 0, proxyOpen: true, adminToken: 'admin-token' }), /only on loopback/)
  assert.deepEqual(
    gemini.requestsSeen().map((s) => s.apiKey),
    [keys[0]],
  )
})

test("a key whose project has spent its day is invisible to the client", async (t) => {
  const keys = keysOf(2, 30)
  const projects = { [keys[0]]: '111111111111', [keys[1]]: '222222222222' }
  const fakeOptions = { projects, limits: { rpm: 1000, rpd: 5, tpm: 10_000_000 } }
  const gemini = await startFakeGemini(fakeOptions)
  gemini.spend({ project: projects[keys[0]], model: MODEL, requests: 5 })
  const { server } = await setup(t, {
    fake: gemini,
    keys: keys.map((apiKey) => ({ apiKey, project: projects[apiKey] })),
  })
  const ai = new GoogleGenAI({ apiKey: TOKEN, httpOptions: { baseUrl: server.url } })
  for (let i = 0; i < 4; i++) {
    assert.match((await ai.models.generateContent({ model: MODEL, contents: 'Hello' })).text, /^Fake answer/)
  }
  // Met at most once (the pool learns the day is spent from that 429), never again.
  assert.ok(gemini.rateLimitedFor({ project: projects[keys[0]] }).length <= 1)
  assert.equal(gemini.acceptedFor({ project: projects[keys[1]] }).length, 4)
})

test('429, 503 and 500 before the first byte are retried: the client sees one answer, with no key in any', async (t) => {
  const { gemini, server, keys } = await setup(t)
  const ai = new GoogleGenAI({ apiKey: TOKEN, httpOptions: { baseUrl: server.url } })
  gemini.failNext('*', 500)
  assert.match((await ai.models.generateContent({ model: MODEL, contents: 'Hello' })).text, /^Fake answer/)
  gemini.failNext('*', 503)
  assert.match((await ai.models.generateContent({ model: MODEL, contents: 'Hello' })).text, /^Fake answer/)
  // An error that is no one's quota passes through, every managed key scrubbed out of it.
  const leak = { error: { code: 400, status: 'INVALID_ARGUMENT', message: `bad request for ${keys[0]} and ${keys[1]}` } }
  gemini.failNext('*', 400, 1, leak)
  const r = await fetch(`${server.url}/v1beta/models/${MODEL}:generateContent`, {
    method: 'POST',
    headers: { 'x-goog-api-key': TOKEN },
    body: JSON.stringify({ contents: [{ parts: [{ text: 'Hi' }] }] }),
  })
  assert.equal(r.status, 400)
  const text = await r.text()
  for (const k of keys) {
    assert.equal(text.includes(k), false)
    assert.ok(text.includes(`${k.slice(0, 8)}...${k.slice(-4)}`), text)
  }
  // Once bytes went to the client, a failure passes through as it is: a stream cut short.
  gemini.breakNextStream(keys[0])
  gemini.breakNextStream(keys[1])
  const cut = await fetch(`${server.url}/v1beta/models/${MODEL}:streamGenerateContent?alt=sse`, {
    method: 'POST',
    headers: { 'x-goog-api-key': TOKEN },
    body: JSON.stringify({ contents: [{ parts: [{ text: 'Hi' }] }] }),
  })
  assert.equal(cut.status, 200)
  await assert.rejects(cut.text())
})

test('timeouts for the first byte and between chunks are 504s; a body over the limit is a 413 not sent on', async (t) => {
  const { gemini, server } = await setup(t, {
    serve: { upstreamFirstByteTimeoutMs: 300, upstreamChunkTimeoutMs: 300, proxyMaxBodyBytes: 4096 },
  })
  const call = (body = JSON.stringify({ contents: [{ parts: [{ text: 'Hi' }] }] })) =>
    fetch(`${server.url}/v1beta/models/${MODEL}:generateContent`, { method: 'POST', headers: { 'x-goog-api-key': TOKEN }, body })
  for (const stall of ['head', 'body']) {
    gemini.stallNext('*', stall)
    const r = await call()
    assert.equal(r.status, 504, stall)
    const answer = await r.json()
    assert.equal(answer.error.status, 'DEADLINE_EXCEEDED')
    assert.match(answer.error.message, /300ms/)
  }
  const before = gemini.requestsSeen().length
  const big = JSON.stringify({ contents: [{ parts: [{ text: 'x'.repeat(5000) }] }] })
  const r = await call(big)
  assert.equal(r.status, 413)
  assert.equal((await r.json()).error.code, 413)
  assert.equal(gemini.requestsSeen().length, before)
  assert.equal((await call()).status, 200)
})

test('hop-by-hop headers, and those the Connection header names, are not forwarded', async (t) => {
  const { gemini, server } = await setup(t)
  const http = require('node:http')
  const body = JSON.stringify({ contents: [{ parts: [{ text: 'Hi' }] }] })
  const status = await new Promise((resolve, reject) => {
    const req = http.request(
      `${server.url}/v1beta/models/${MODEL}:generateContent`,
      {
        method: 'POST',
        headers: {
          'x-goog-api-key': TOKEN,
          connection: 'keep-alive, x-hop-only',
          'x-hop-only': '1',
          'keep-alive': 'timeout=5',
          te: 'trailers',
          'x-goog-api-client': 'curl/1',
        },
      },
      (res) => {
        res.resume()
        res.on('end', () => resolve(res.statusCode))
      },
    )
    req.on('error', reject)
    req.end(body)
  })
  assert.equal(status, 200)
  const [seen] = gemini.requestsSeen()
  assert.equal(seen.headers['x-goog-api-client'], 'curl/1')
  for (const name of ['x-hop-only', 'keep-alive', 'te']) assert.equal(seen.headers[name], undefined, name)
})

/** A CA and a certificate it signed for 127.0.0.1 and localhost, made with openssl in `dir`. */
function testCertificates(dir) {
  const run = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' })
  run('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=gemini-key-manager test CA')
  run('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'leaf.key', '-out', 'leaf.csr', '-subj', '/CN=127.0.0.1')
  fs.writeFileSync(path.join(dir, 'leaf.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n')
  run('x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'leaf.pem', '-days', '2', '-extfile', 'leaf.ext')
  return { ca: path.join(dir, 'ca.pem'), key: fs.readFileSync(path.join(dir, 'leaf.key')), cert: fs.readFileSync(path.join(dir, 'leaf.pem')) }
}

test('TLS to an upstream with a test certificate: trusted through GEMINI_CA_FILE, refused without it', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gkm-tls-'))
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }))
  const { ca, key, cert } = testCertificates(dir)
  const gemini = await startFakeGemini({ limits: LIMITS, tls: { key, cert } })
  assert.match(gemini.url, /^https:/)
  const keys = keysOf(1, 40)
  process.env.GEMINI_BASE_URL = gemini.url
  const m = new ApiKeyManagerService({ keys, limits: LIMITS, model: MODEL, quiet: true, routeRequests: false })
  await m.initialize()
  t.after(async () => {
    await m.close()
    delete process.env.GEMINI_BASE_URL
    delete process.env.GEMINI_CA_FILE
    await gemini.close()
  })
  const generate = (server) =>
    fetch(`${server.url}/v1beta/models/${MODEL}:generateContent`, {
      method: 'POST',
      headers: { 'x-goog-api-key': TOKEN },
      body: JSON.stringify({ contents: [{ parts: [{ text: 'Hi' }] }] }),
    })
  const untrusting = await m.serve({ host: '127.0.0.1', port: 0, proxyTokens: [TOKEN] })
  const refused = await generate(untrusting)
  assert.equal(refused.status, 502)
  assert.match((await refused.json()).error.message, /certificate|UnknownIssuer/i)
  await untrusting.close()
  assert.equal(gemini.totals().accepted, 0)

  process.env.GEMINI_CA_FILE = ca
  const trusting = await m.serve({ host: '127.0.0.1', port: 0, proxyTokens: [TOKEN] })
  const answered = await generate(trusting)
  assert.equal(answered.status, 200)
  assert.match((await answered.json()).candidates[0].content.parts[0].text, /^Fake answer/)
  assert.equal(gemini.requestsSeen().at(-1).apiKey, keys[0])
  await trusting.close()

  process.env.GEMINI_CA_FILE = path.join(dir, 'missing.pem')
  await assert.rejects(m.serve({ host: '127.0.0.1', port: 0, proxyTokens: [TOKEN] }), /GEMINI_CA_FILE/)
})

test('with revalidateIntervalMs a key Gemini refused is re-tested with GET models and comes back', async (t) => {
  const keys = keysOf(2, 50)
  const { m, gemini, server } = await setup(t, { keys, manager: { revalidateIntervalMs: 100 } })
  gemini.setInvalid(keys[0])
  const ai = new GoogleGenAI({ apiKey: TOKEN, httpOptions: { baseUrl: server.url } })
  // The refused key is retried on the other: the client never sees the refusal.
  for (let i = 0; i < 2; i++) await ai.models.generateContent({ model: MODEL, contents: 'Hello' })
  assert.equal((await statusOf(m, keys[0])).isActive, false)
  gemini.setInvalid(keys[0], false)
  for (let i = 0; i < 100 && !(await statusOf(m, keys[0])).isActive; i++) await sleep(20)
  assert.equal((await statusOf(m, keys[0])).isActive, true)
  const retests = gemini.requestsSeen().filter((r) => r.method === 'GET' && r.apiKey === keys[0])
  assert.ok(retests.length >= 1)
  for (const r of retests) assert.equal(r.path, `/v1beta/models/${MODEL}`)
})

/** Waits for `pattern` in what `proc` printed; resolves to the match. */
function waitForLine(proc, pattern, output) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${pattern} in:\n${output.text}`)), 20_000)
    const check = () => {
      const m = pattern.exec(output.text)
      if (m) {
        clearTimeout(timer)
        resolve(m)
      }
    }
    proc.stdout.on('data', check)
    proc.once('exit', () => reject(new Error(`exited:\n${output.text}`)))
  })
}

/** curl with `args`, asynchronously: the fake Gemini answers on this process's event loop. */
function curl(args) {
  return new Promise((resolve, reject) => {
    execFile('curl', ['-sS', '-w', '\n%{http_code}', ...args], { encoding: 'utf8', timeout: 20_000 }, (error, stdout, stderr) => {
      if (error) return reject(new Error(`curl ${args.join(' ')}: ${error.message}\n${stderr}`))
      const at = stdout.lastIndexOf('\n')
      resolve({ status: Number(stdout.slice(at + 1)), body: stdout.slice(0, at), stderr })
    })
  })
}

test('npm start serves the proxy to curl; no managed key in any answer, log line or upstream URL', async (t) => {
  const keys = keysOf(2, 60)
  const gemini = await startFakeGemini({ limits: LIMITS })
  const output = { text: '' }
  const proc = spawn(process.execPath, [path.join(PKG, 'bin/gemini-key-manager.js'), 'serve', '--host', '127.0.0.1', '--port', '0', '--access-log'], {
    env: cleanEnv({ GEMINI_API_KEYS: keys.join(','), GEMINI_BASE_URL: gemini.url, KEY_MANAGER_PROXY_TOKENS: `other-token,${TOKEN}`, GEMINI_MODEL: MODEL }),
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  proc.stdout.on('data', (d) => (output.text += d))
  proc.stderr.on('data', (d) => (output.text += d))
  t.after(async () => {
    if (proc.exitCode === null) {
      proc.kill('SIGTERM')
      await new Promise((resolve) => proc.once('exit', resolve))
    }
    await gemini.close()
  })
  const [, url] = await waitForLine(proc, /🔀 Gemini proxy for any SDK at (http:\/\/[0-9.:]+)\/v1beta/, output)
  const gen = `${url}/v1beta/models/${MODEL}`
  const json = ['-H', 'content-type: application/json']
  const prompt = JSON.stringify({ contents: [{ parts: [{ text: 'Hi' }] }] })

  const generated = await curl([...json, '-H', `x-goog-api-key: ${TOKEN}`, '-d', prompt, `${gen}:generateContent`])
  assert.equal(generated.status, 200, generated.body + generated.stderr)
  assert.match(JSON.parse(generated.body).candidates[0].content.parts[0].text, /^Fake answer/)
  const sse = await curl(['-N', ...json, '-d', prompt, `${gen}:streamGenerateContent?alt=sse&key=${TOKEN}`])
  assert.equal(sse.status, 200)
  assert.equal(sse.body.split('data: ').length - 1, 3)
  const array = await curl([...json, '-H', `x-goog-api-key: ${TOKEN}`, '-d', prompt, `${gen}:streamGenerateContent`])
  assert.equal(JSON.parse(array.body).length, 3)
  const counted = await curl([...json, '-H', `x-goog-api-key: ${TOKEN}`, '-d', prompt, `${gen}:countTokens`])
  assert.equal(typeof JSON.parse(counted.body).totalTokens, 'number')
  const embedded = await curl([...json, '-H', `x-goog-api-key: ${TOKEN}`, '-d', JSON.stringify({ content: { parts: [{ text: 'Hi' }] } }), `${url}/v1/models/${EMBEDDING}:embedContent`])
  assert.equal(JSON.parse(embedded.body).embedding.values.length, 8)
  const chatBody = { model: MODEL, messages: [{ role: 'user', content: 'Hi' }] }
  const chat = await curl([...json, '-H', `Authorization: Bearer ${TOKEN}`, '-d', JSON.stringify(chatBody), `${url}/v1beta/openai/chat/completions`])
  assert.match(JSON.parse(chat.body).choices[0].message.content, /^Fake answer/)
  const chatStream = await curl(['-N', ...json, '-H', `Authorization: Bearer ${TOKEN}`, '-d', JSON.stringify({ ...chatBody, stream: true }), `${url}/v1beta/openai/chat/completions`])
  assert.match(chatStream.body, /data: \[DONE\]/)
  const wrong = await curl([...json, '-H', 'x-goog-api-key: nope', '-d', prompt, `${gen}:generateContent`])
  assert.equal(wrong.status, 401)
  assert.equal(JSON.parse(wrong.body).error.status, 'UNAUTHENTICATED')
  assert.equal(gemini.requestsSeen().length, 7)

  proc.kill('SIGTERM')
  await new Promise((resolve) => proc.once('exit', resolve))
  const answers = [generated, sse, array, counted, embedded, chat, chatStream, wrong].map((a) => a.body).join('\n')
  for (const k of keys) {
    assert.equal(answers.includes(k), false, 'a key in an answer')
    assert.equal(output.text.includes(k), false, `a key in the log:\n${output.text}`)
  }
  assert.equal(output.text.includes(TOKEN), false, 'the token in the log')
  assert.match(output.text, /POST \/v1beta\/models\/gemini-2.0-flash:streamGenerateContent 200/)
  assertOnlyPoolKeysUpstream(gemini, keys)
})
