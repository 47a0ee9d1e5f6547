'use strict'

// Routes the app's own Gemini calls through the pool. The Google SDKs (@google/generative-ai, which
// LangChain's ChatGoogleGenerativeAI uses, and @google/genai) send their requests with the global
// `fetch`; this module wraps it once, at require. A request to Gemini's host (or GEMINI_BASE_URL's
// origin) whose key belongs to a manager that routes goes to that manager's loopback server
// instead, where the native router picks the key, waits for room, retries and counts. Any other
// request (another host, a key no manager owns) goes out untouched.

const { randomBytes } = require('node:crypto')
const { geminiRequests } = require('../binding.js')

// Google's origin, the key's header, and the header of the token the loopback server wants (only
// requests from this process carry it); `baseUrl` is read when routing starts.
const { googleOrigin, keyHeader: KEY_HEADER, routeTokenHeader: ROUTE_TOKEN_HEADER } = geminiRequests()

/** Managers that route, in the order they started; the first that owns a key routes it. */
const routing = new Set()
let sendDirect = null
let interceptedOrigins = null
let announced = false

/** Wraps the global fetch, once. */
function install() {
  if (sendDirect !== null) return
  if (typeof globalThis.fetch !== 'function') return
  sendDirect = globalThis.fetch
  interceptedOrigins = new Set([googleOrigin])
  try {
    interceptedOrigins.add(new URL(geminiRequests().baseUrl).origin)
  } catch {
    // The native side reports a bad GEMINI_BASE_URL when the router starts.
  }
  globalThis.fetch = function fetch(input, init) {
    return routing.size === 0 ? sendDirect(input, init) : routedFetch(input, init)
  }
}

/** The URL of what fetch was given, or null when it is not one. */
function urlOf(input) {
  try {
    if (typeof input === 'string') return new URL(input)
    if (input instanceof URL) return input
    if (input instanceof Request) return new URL(input.url)
  } catch {
    // Not a URL: fetch itself will say so.
  }
  return null
}

/** The key a Gemini request carries: its header (either form of init.headers) or `?key=`. */
function keyOf(input, init, url) {
  const headers = init?.headers ?? (input instanceof Request ? input.headers : undefined)
  let key = null
  if (headers instanceof Headers) key = headers.get(KEY_HEADER)
  else if (Array.isArray(headers)) key = headers.find(([name]) => String(name).toLowerCase() === KEY_HEADER)?.[1] ?? null
  else if (headers !== null && typeof headers === 'object') {
    for (const name of Object.keys(headers)) if (name.toLowerCase() === KEY_HEADER) key = headers[name]
  }
  return typeof key === 'string' && key !== '' ? key : url.searchParams.get('key')
}

async function routedFetch(input, init) {
  const url = urlOf(input)
  if (url === null || !interceptedOrigins.has(url.origin)) return sendDirect(input, init)
  const key = keyOf(input, init, url)
  if (key === null) return sendDirect(input, init)
  let manager = null
  for (const m of routing) {
    if (m._ownsKey(key)) {
      manager = m
      break
    }
  }
  if (manager === null) return sendDirect(input, init)
  const target = await manager._routeTarget()
  // The manager closed meanwhile, or its server could not start (said once in the log).
  if (target === null) return sendDirect(input, init)
  const source = new Request(input, init)
  const headers = new Headers(source.headers)
  headers.set(KEY_HEADER, key)
  headers.set(ROUTE_TOKEN_HEADER, target.token)
  url.searchParams.delete('key')
  const body = source.body === null ? undefined : await source.arrayBuffer()
  return sendDirect(`${target.url}${url.pathname}${url.search}`, {
    method: source.method,
    headers,
    body,
    signal: source.signal,
  })
}

/**
 * The loopback server one manager routes through, started on first use: `start(token)` resolves
 * to the native server (which says in the log when it cannot start).
 */
class RouteServer {
  constructor(start) {
    this._start = start
    this._token = randomBytes(32).toString('hex')
    this._starting = null
    this._server = null
    this._closed = false
  }

  /** `{ url, token }`, or null once closed or when the server could not start. */
  target() {
    if (this._closed) return Promise.resolve(null)
    this._starting ??= this._start(this._token).then(
      (server) => {
        if (this._closed) {
          server.close()
          return null
        }
        this._server = server
        return { url: `http://127.0.0.1:${server.port}`, token: this._token }
      },
      () => null,
    )
    return this._starting
  }

  async close() {
    this._closed = true
    if (this._starting !== null) await this._starting
    if (this._server !== null) await this._server.close()
  }
}

/**
 * Starts routing `manager`'s keys (`_ownsKey(key)`, `_routeTarget()`); says so once per process with
 * `announce()`, which returns whether it did (a quiet manager does not).
 */
function route(manager, announce) {
  install()
  if (sendDirect === null) return false
  routing.add(manager)
  if (!announced) announced = announce()
  return true
}

function unroute(manager) {
  routing.delete(manager)
}

module.exports = { route, unroute, RouteServer }
