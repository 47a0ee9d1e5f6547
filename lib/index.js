'use strict'

// The drop-in face of gemini-key-manager: the old apiKeyManager.ts API (async, same names, same
// shapes) over the native pool. Each call is one synchronous native call; the native side writes
// the key's figures into the `results` array, and the key's status object (one per key, kept for
// the life of the manager) is updated from it, so no object is built in Rust on the hot path.

const {
  NativeKeyPool,
  resultsLayout,
  keyFingerprint,
  keyRoutesAdminToken,
  isRetryable,
  errorReply,
  setLogSink,
  flushLog,
  shown,
  DEFAULT_MAX_BODY_BYTES,
} = require('../binding.js')
const routing = require('./routing.js')

// Every log line of the addon, Rust's and this file's alike, leaves through here, in the order
// it was said (SPEC section 3): information on stdout, warnings and errors on stderr.
setLogSink((level, line) => {
  if (level === 'error') console.error(line)
  else if (level === 'warn') console.warn(line)
  else console.log(line)
})
// Lines other threads said just before the end would otherwise wait for a turn of the event loop
// that never comes.
process.on('exit', flushLog)

const LAYOUT = resultsLayout()
/** A slot's position in the native layout; a name the layout lacks is a build mismatch. */
function slot(name) {
  const i = LAYOUT.slots.indexOf(name)
  if (i < 0) throw new Error(`gemini-key-manager: the native addon has no result slot '${name}' (rebuild it)`)
  return i
}
// Written out as a literal, not built with Object.fromEntries: an object of this many properties
// built at run time is a dictionary, and every hot-path read of it would take V8's slow path.
const SLOT = {
  currentIndex: slot('currentIndex'),
  errorCount: slot('errorCount'),
  errorSeq: slot('errorSeq'),
  isActive: slot('isActive'),
  lastErrorTime: slot('lastErrorTime'),
  lastRotation: slot('lastRotation'),
  lastUsed: slot('lastUsed'),
  method: slot('method'),
  previousKeyScore: slot('previousKeyScore'),
  rotationReason: slot('rotationReason'),
  rpdCurrent: slot('rpdCurrent'),
  rpdLimit: slot('rpdLimit'),
  rpdResetTime: slot('rpdResetTime'),
  rpmCurrent: slot('rpmCurrent'),
  rpmLimit: slot('rpmLimit'),
  rpmResetTime: slot('rpmResetTime'),
  score: slot('score'),
  state: slot('state'),
  stateUntil: slot('stateUntil'),
  totalAvailable: slot('totalAvailable'),
  tpmCurrent: slot('tpmCurrent'),
  tpmLimit: slot('tpmLimit'),
  tpmResetTime: slot('tpmResetTime'),
  arg0: slot('arg0'),
  arg1: slot('arg1'),
  arg2: slot('arg2'),
  arg3: slot('arg3'),
}
// Per key, the values behind its status object's Dates and error message: lastUsed, the three
// reset times, the error sequence, stateUntil.
const SEEN = 6

// recordUsage's success is the same answer every time: one frozen result and one settled promise
// spare the hot path two allocations.
const RECORDED = Object.freeze({ success: true, metadata: Object.freeze({}) })
const RECORDED_PROMISE = Promise.resolve(RECORDED)
// No key handed out yet: equal to nothing a caller can pass.
const NONE_HANDED = Symbol('none handed out')

// Longer error texts (an option echoed back, say) are cut: a failure is read by people.
const MAX_ERROR_LENGTH = 1000

/** An argument for an `arg` slot: a non-number is NaN there, which the native side takes as missing. */
function arg(value) {
  return typeof value === 'number' ? value : NaN
}

/** A budget's instants (epoch ms or ISO strings) as Dates, in place. */
function datedBudget(budget) {
  if (budget.stateUntil !== null) budget.stateUntil = new Date(budget.stateUntil)
  for (const window of [budget.rpm, budget.rpd, budget.tpm]) window.resetTime = new Date(window.resetTime)
  return budget
}

function failure(error, metadata = {}) {
  const text = error.length > MAX_ERROR_LENGTH ? `${error.slice(0, MAX_ERROR_LENGTH)}…` : error
  return { success: false, error: text, metadata }
}

/** The message of anything thrown, even a revoked proxy or an object whose conversion throws. */
function messageOf(e) {
  try {
    const text = e instanceof Error ? e.message : String(e)
    return typeof text === 'string' && text !== '' ? text : 'Unknown error'
  } catch {
    return 'Unknown error'
  }
}

/** A failure for a throw no check foresaw (a hostile getter, a revoked proxy): SPEC methods resolve, never reject. */
function unexpected(e) {
  return failure(`invalid argument: ${messageOf(e)}`)
}

function newStatus(apiKey) {
  const window = () => ({ current: 0, limit: 0, resetTime: new Date(0) })
  return {
    apiKey,
    isActive: true,
    lastUsed: new Date(0),
    limits: { rpm: window(), rpd: window(), tpm: window() },
    errorCount: 0,
    lastError: undefined,
    lastErrorTime: undefined,
    state: 'active',
    stateUntil: undefined,
  }
}

/**
 * An error as text the native side can classify: the message plus whatever Gemini's SDKs attach
 * (HTTP status, `errorDetails` with RetryInfo and QuotaFailure, a response body).
 */
function describeError(error) {
  try {
    return describeErrorParts(error)
  } catch {
    // A getter or conversion threw: the failure still counts, described as well as it can be.
    return messageOf(error)
  }
}

function describeErrorParts(error) {
  if (error == null) return 'Unknown error'
  if (typeof error !== 'object') return String(error)
  const parts = [error.message ?? String(error)]
  const status = error.status ?? error.statusCode ?? error.code ?? error.response?.status
  if (status !== undefined) parts.push(`status ${status}`)
  for (const extra of [error.errorDetails, error.error, error.response?.data]) {
    if (extra === undefined) continue
    try {
      parts.push(typeof extra === 'string' ? extra : JSON.stringify(extra))
    } catch {
      // A circular structure says nothing we could use.
    }
  }
  // Not truncated here: the native side masks keys first, then cuts, so no key is cut in half.
  return parts.join(' ')
}

/** The total token count a Gemini SDK result reports, if it does. */
function tokensOf(result) {
  const usage = result?.response?.usageMetadata ?? result?.usageMetadata
  const total = usage?.totalTokenCount
  return Number.isInteger(total) && total >= 0 ? total : undefined
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

class ApiKeyManagerService {
  /**
   * @param {import('..').ApiKeyManagerOptions} [options] see index.d.ts; read (and
   *   checked) by the native pool on first use
   */
  constructor(options) {
    this._options = options
    this._native = null
    this._initError = null
    this._closed = false
    this._results = null
    this._hot = null
    // The key the last getBestAvailableKey handed out, and its position.
    this._lastHanded = NONE_HANDED
    this._lastHandedAt = -1
    this._keys = []
    this._index = new Map()
    this._status = []
    // Per key: the millisecond values behind its Date fields and its error sequence, so a Date is
    // only replaced, and the error message only fetched, when it changed.
    this._seen = null
    // With MongoDB: the attachment's outcome once started, and the exit hooks that flush on the
    // way out.
    this._storeStart = null
    this._exitHooks = null
    this._closing = null
    // The loopback server the app's own Gemini requests are routed through; null when not routing.
    this._routeServer = null
    // Model names to the native ids the calls about a model take.
    this._models = new Map()
  }

  /**
   * The native id of `options.model` (undefined without one: the default model, or for a report
   * the model of its hand-out). Throws on a name that is no model's.
   */
  _modelId(options) {
    const name = options?.model
    if (name === undefined || name === null) return undefined
    let id = this._models.get(name)
    if (id === undefined) {
      id = this._native.modelId(name)
      this._models.set(name, id)
    }
    return id
  }

  /** Builds the native pool on first use; returns an error message when it cannot. */
  _ready() {
    if (this._closed) return 'API key manager is closed'
    if (this._native !== null) return null
    if (this._initError !== null) return this._initError
    try {
      this._native = new NativeKeyPool(this._options)
    } catch (e) {
      this._initError = messageOf(e)
      return this._initError
    } finally {
      this._options = undefined
    }
    this._hot = this._native.hotPath()
    this._results = this._hot.results
    this._seen = new Float64Array(0)
    this._syncKeys()
    if (this._native.routesRequests) this._startRouting()
    const store = this._native.storeOptions
    if (store !== null) this._storeStart = this._attachStore(store)
    else this._native.announceInMemory()
    return null
  }

  /** Routes the app's own Gemini requests that carry this manager's keys (see lib/routing.js). */
  _startRouting() {
    const native = this._native
    this._routeServer = new routing.RouteServer((routeToken) => native.routeServer(routeToken))
    const started = routing.route(this, () => native.announceRouting())
    if (!started) this._routeServer = null
  }

  /** Whether `apiKey` is one of the pool's (added at run time included). */
  _ownsKey(apiKey) {
    if (this._closed || this._native === null) return false
    if (this._index.has(apiKey)) return true
    if (this._native.keyCount() === this._keys.length) return false
    this._syncKeys()
    return this._index.has(apiKey)
  }

  /** Where this manager's routed requests go: `{ url, token }`, or null. */
  _routeTarget() {
    return this._routeServer === null ? Promise.resolve(null) : this._routeServer.target()
  }

  /**
   * Connects to MongoDB (within mongoConnectTimeoutMs), merges what it holds into the pool and
   * starts writing behind; or, when the server cannot be reached, runs in memory while the native
   * side keeps trying. The native side says how it went in the log. Resolves to `{ connected,
   * error }`; never rejects.
   */
  async _attachStore(store) {
    let start
    try {
      start = await this._native.attachStore(store)
    } catch (e) {
      // Refused options: no writer was started, so this manager stays in memory for good.
      return { connected: false, error: messageOf(e) }
    }
    if (!this._closed) {
      this._allStatuses()
      this._installExitHooks()
    }
    return start
  }

  /**
   * Flushes to MongoDB when the process ends normally (beforeExit: the pending flush keeps the
   * event loop alive until it is written) or on SIGINT/SIGTERM. A signal that nobody else listens
   * for is raised again once flushed, so the process still ends as it would have; when the
   * application handles it (the bin does), ending the process is left to it.
   */
  _installExitHooks() {
    const onExit = () => {
      this.close()
    }
    const onSignal = (signal) => {
      // An application that handles the signal itself (the bin does: it lets the HTTP server
      // drain first) closes the manager when it is ready; closing here would fail its in-flight
      // requests.
      if (process.listenerCount(signal) > 1) return
      this.close().finally(() => process.kill(process.pid, signal))
    }
    process.once('beforeExit', onExit)
    process.on('SIGINT', onSignal)
    process.on('SIGTERM', onSignal)
    this._exitHooks = { onExit, onSignal }
  }

  _removeExitHooks() {
    if (this._exitHooks === null) return
    const { onExit, onSignal } = this._exitHooks
    process.removeListener('beforeExit', onExit)
    process.removeListener('SIGINT', onSignal)
    process.removeListener('SIGTERM', onSignal)
    this._exitHooks = null
  }

  /** The reason a call cannot be served, as a failure result; selection calls name no key. */
  _unavailable(reason, fallback) {
    return reason === this._initError ? failure(fallback, { cause: reason }) : failure(reason)
  }

  /**
   * Takes in the keys the pool gained since last looked (added here or, through MongoDB, in another
   * process): positions never change, so the arrays only grow.
   */
  /**
   * A hand-out of key i, added elsewhere (the HTTP API, another process): learning the new keys
   * reads their figures into the result slots, so key i's are read back for the caller.
   */
  _learnKeysFor(i) {
    this._syncKeys()
    this._figures(i)
  }

  _syncKeys() {
    const keys = this._native.keys()
    const known = this._keys.length
    if (keys.length === known) return
    const seen = new Float64Array(keys.length * SEEN).fill(NaN)
    seen.set(this._seen)
    this._seen = seen
    for (let i = known; i < keys.length; i++) {
      this._keys.push(keys[i])
      this._index.set(keys[i], i)
      this._status.push(newStatus(keys[i]))
      this._figures(i)
      // Limits are fixed for a key's life: set here once, not on every refresh.
      const { rpm, rpd, tpm } = this._refresh(i).limits
      rpm.limit = this._results[SLOT.rpmLimit]
      rpd.limit = this._results[SLOT.rpdLimit]
      tpm.limit = this._results[SLOT.tpmLimit]
    }
  }

  /** Writes key i's figures into the result array. */
  _figures(i) {
    this._results[SLOT.arg0] = i
    this._hot.figures()
  }

  /** Copies key i's figures from the result array into its status object. */
  _refresh(i) {
    const s = this._results
    const seen = this._seen
    const at = i * SEEN
    const status = this._status[i]
    const { rpm, rpd, tpm } = status.limits
    status.isActive = s[SLOT.isActive] === 1
    rpm.current = s[SLOT.rpmCurrent]
    rpd.current = s[SLOT.rpdCurrent]
    tpm.current = s[SLOT.tpmCurrent]
    status.errorCount = s[SLOT.errorCount]
    status.state = LAYOUT.states[s[SLOT.state]]
    // Dates and the error message change rarely: replace them only when they did.
    if (seen[at] !== s[SLOT.lastUsed]) status.lastUsed = new Date((seen[at] = s[SLOT.lastUsed]))
    if (seen[at + 1] !== s[SLOT.rpmResetTime]) rpm.resetTime = new Date((seen[at + 1] = s[SLOT.rpmResetTime]))
    if (seen[at + 2] !== s[SLOT.rpdResetTime]) rpd.resetTime = new Date((seen[at + 2] = s[SLOT.rpdResetTime]))
    if (seen[at + 3] !== s[SLOT.tpmResetTime]) tpm.resetTime = new Date((seen[at + 3] = s[SLOT.tpmResetTime]))
    if (seen[at + 4] !== s[SLOT.errorSeq]) {
      seen[at + 4] = s[SLOT.errorSeq]
      const errorTime = s[SLOT.lastErrorTime]
      status.lastError = this._native.lastError(i) ?? undefined
      status.lastErrorTime = Number.isNaN(errorTime) ? undefined : new Date(errorTime)
    }
    if (!Object.is(seen[at + 5], s[SLOT.stateUntil])) {
      seen[at + 5] = s[SLOT.stateUntil]
      status.stateUntil = Number.isNaN(seen[at + 5]) ? undefined : new Date(seen[at + 5])
    }
    return status
  }

  /** A failed selection; when keys are only busy, `metadata.nextAvailableAt` says until when. */
  _noKey(e, estimatedTokens, model) {
    const error = messageOf(e)
    if (error !== 'No active API keys available') return failure(error)
    const at = this._native.nextAvailableAt(typeof estimatedTokens === 'number' ? estimatedTokens : 0, model)
    return failure(error, at === null ? {} : { nextAvailableAt: new Date(at) })
  }

  /** Looks up a key given by a caller: its position, or a failure result. */
  _locate(apiKey) {
    // Most recordUsage calls name the key just handed out: an identity check spares the Map's
    // string hashing and comparison.
    if (apiKey === this._lastHanded) return this._lastHandedAt
    if (typeof apiKey !== 'string') return failure('API key must be a string')
    const i = this._index.get(apiKey)
    return i === undefined ? failure('API key not found') : i
  }

  _managerInfo() {
    this._native.summary()
    const keys = this._allStatuses()
    return {
      keys,
      currentIndex: this._results[SLOT.currentIndex],
      totalKeys: keys.length,
      lastRotation: new Date(this._results[SLOT.lastRotation]),
    }
  }

  /** Every key in the pool (removed ones are not), refreshed. */
  _allStatuses() {
    if (this._native.keyCount() !== this._keys.length) this._syncKeys()
    const listed = []
    for (let i = 0; i < this._keys.length; i++) {
      this._figures(i)
      const status = this._refresh(i)
      if (status.state !== 'removed') listed.push(status)
    }
    return listed
  }

  async initialize() {
    const reason = this._ready()
    if (reason !== null) return failure(reason)
    const connected = this._storeStart !== null && (await this._storeStart).connected
    if (this._closed) return failure('API key manager is closed')
    const data = this._managerInfo()
    return {
      success: true,
      data,
      metadata: connected ? { totalKeys: data.totalKeys } : { totalKeys: data.totalKeys, mode: 'in-memory' },
    }
  }

  /**
   * What the MongoDB writer has done: `{ connected, ops, queued, pending, dropped }` (database
   * round trips, recorded calls waiting, being retried, dropped); null without MongoDB.
   */
  persistenceStats() {
    return this._native === null ? null : this._native.persistenceStats()
  }

  // The two hot calls return Promise.resolve(...) from a plain function: an `async` function costs
  // about twice as much per call, and both bodies catch every failure themselves.
  /**
   * @param {{ estimatedTokens?: number }} [options] tokens the call is expected to use: reserved on
   *   the key's TPM until `recordUsage` reports the real count.
   */
  getBestAvailableKey(options) {
    try {
      return Promise.resolve(this._best(options?.estimatedTokens ?? 0, options))
    } catch (e) {
      return Promise.resolve(unexpected(e))
    }
  }

  _best(estimatedTokens, options) {
    const reason = this._ready()
    if (reason !== null) return this._unavailable(reason, 'No active API keys available')
    let i
    let model
    try {
      model = this._modelId(options)
      const s = this._results
      s[SLOT.arg0] = arg(estimatedTokens)
      s[SLOT.arg1] = arg(model)
      i = this._hot.best()
    } catch (e) {
      return this._noKey(e, estimatedTokens, model)
    }
    if (i >= this._keys.length) this._learnKeysFor(i)
    const s = this._results
    const apiKey = this._keys[i]
    this._lastHanded = apiKey
    this._lastHandedAt = i
    return {
      success: true,
      data: [apiKey, this._refresh(i)],
      metadata: {
        availabilityScore: s[SLOT.score],
        totalAvailable: s[SLOT.totalAvailable],
        rotationMethod: LAYOUT.methods[s[SLOT.method]],
      },
    }
  }

  async getNextKeyForRotation(options) {
    const reason = this._ready()
    if (reason !== null) return this._unavailable(reason, 'No active API keys available')
    let i
    let model
    const estimatedTokens = options?.estimatedTokens ?? 0
    try {
      model = this._modelId(options)
      i = this._native.rotate(estimatedTokens, model)
    } catch (e) {
      return this._noKey(e, estimatedTokens, model)
    }
    if (i >= this._keys.length) this._learnKeysFor(i)
    const s = this._results
    const rotationReason = LAYOUT.reasons[s[SLOT.rotationReason]]
    const metadata = { availabilityScore: s[SLOT.score], rotationReason }
    if (rotationReason === 'proactive-rotation') {
      metadata.previousKeyScore = s[SLOT.previousKeyScore]
    } else {
      metadata.totalAvailable = s[SLOT.totalAvailable]
      metadata.rotationMethod = LAYOUT.methods[s[SLOT.method]]
    }
    return { success: true, data: [this._keys[i], this._refresh(i)], metadata }
  }

  recordUsage(apiKey, tokensUsed, success, error, responseTime, options) {
    let result
    try {
      result = this._recordUsage(apiKey, tokensUsed, success, error, responseTime, options)
    } catch (e) {
      result = unexpected(e)
    }
    return result === RECORDED ? RECORDED_PROMISE : Promise.resolve(result)
  }

  _recordUsage(apiKey, tokensUsed, success, error, responseTime, options) {
    const reason = this._ready()
    if (reason !== null) return this._unavailable(reason, 'API key not found')
    const i = this._locate(apiKey)
    if (typeof i !== 'number') return i
    // A failed call often has no token count; its failure must be counted all the same.
    if (success && typeof tokensUsed !== 'number') {
      return failure(`tokensUsed must be a number (got ${typeof tokensUsed})`)
    }
    try {
      const model = options === undefined ? undefined : this._modelId(options)
      if (success) {
        const s = this._results
        s[SLOT.arg0] = i
        s[SLOT.arg1] = tokensUsed
        s[SLOT.arg2] = arg(responseTime)
        s[SLOT.arg3] = arg(model)
        this._hot.recordSuccess()
      } else {
        const tokens = typeof tokensUsed === 'number' ? tokensUsed : 0
        const ms = typeof responseTime === 'number' ? responseTime : undefined
        this._native.recordFailure(i, tokens, describeError(error), ms, model)
      }
    } catch (e) {
      return failure(messageOf(e))
    }
    this._refresh(i)
    return RECORDED
  }

  /**
   * After a 429 from Gemini: the key rests until that window frees, or for `retryAfterMs` (the
   * `retryDelay` of Gemini's error) when given. It does not count toward deactivation.
   */
  async handleRateLimit(apiKey, limitType, options) {
    const reason = this._ready()
    if (reason !== null) return this._unavailable(reason, 'API key not found')
    const i = this._locate(apiKey)
    if (typeof i !== 'number') return i
    try {
      this._native.handleRateLimit(i, limitType, options?.retryAfterMs, this._modelId(options))
    } catch (e) {
      return failure(messageOf(e))
    }
    this._refresh(i)
    return { success: true, metadata: { limitType } }
  }

  async getRateLimitInfo(apiKey, options) {
    const reason = this._ready()
    if (reason !== null) return this._unavailable(reason, 'API key not found')
    const i = this._locate(apiKey)
    if (typeof i !== 'number') return i
    let info
    try {
      info = this._native.rateLimitInfo(i, this._modelId(options))
    } catch (e) {
      // A key removed since: not found.
      return failure(messageOf(e))
    }
    const data = info.map((w) => ({ ...w, resetTime: new Date(w.resetTime) }))
    return { success: true, data, metadata: {} }
  }

  async getAllKeysStatus() {
    const reason = this._ready()
    if (reason !== null) return this._unavailable(reason, 'No active API keys available')
    const data = this._allStatuses()
    this._describeBudgets(data)
    return {
      success: true,
      data,
      metadata: { totalKeys: data.length, activeKeys: data.filter((k) => k.isActive).length },
    }
  }

  /**
   * Gives each status its key's `project` (null: not known) and `models`: its project's windows
   * per model met, `{ [model]: { state, stateUntil, availabilityScore, rpm, rpd, tpm } }`.
   */
  _describeBudgets(statuses) {
    const budgets = this._native.budgets()
    const byKey = new Map(statuses.map((s) => [s.apiKey, s]))
    for (let i = 0; i < budgets.length; i++) {
      const status = byKey.get(this._keys[i])
      if (status === undefined) continue
      status.project = budgets[i].project ?? null
      status.models = Object.fromEntries(
        budgets[i].models.map((b) => [
          b.model,
          datedBudget({
            state: b.state,
            stateUntil: b.stateUntil ?? null,
            availabilityScore: b.availabilityScore,
            rpm: { ...b.rpm },
            rpd: { ...b.rpd },
            tpm: { ...b.tpm },
          }),
        ]),
      )
    }
  }

  async reactivateKey(apiKey) {
    const reason = this._ready()
    if (reason !== null) return this._unavailable(reason, 'API key not found')
    const i = this._locate(apiKey)
    if (typeof i !== 'number') return i
    try {
      this._native.reactivate(i)
    } catch (e) {
      return failure(messageOf(e))
    }
    this._refresh(i)
    return { success: true, metadata: {} }
  }

  /**
   * Adds a key to the pool at run time: it is handed out from now on, and with MongoDB every
   * process sharing the database takes it in within a few seconds (stored sealed: that needs
   * KEY_MANAGER_FINGERPRINT_SECRET). A removed key comes back. `data` is its status.
   */
  async addKey(apiKey, options) {
    const reason = this._ready()
    if (reason !== null) return failure(reason)
    let i
    try {
      i = this._native.addKey(apiKey, options?.project)
    } catch (e) {
      return failure(messageOf(e))
    }
    this._syncKeys()
    return { success: true, data: this._refresh(i), metadata: { totalKeys: this._allStatuses().length } }
  }

  /** Takes a key out of the pool (its usage history stays); every process sharing MongoDB follows. */
  async removeKey(apiKey) {
    return this._admit(apiKey, 'removed')
  }

  /** Takes a key out of service until `enableKey`; every process sharing MongoDB follows. */
  async disableKey(apiKey) {
    return this._admit(apiKey, 'disabled')
  }

  /** Puts a disabled key back into service; every process sharing MongoDB follows. */
  async enableKey(apiKey) {
    return this._admit(apiKey, 'enabled')
  }

  async _admit(apiKey, admission) {
    const reason = this._ready()
    if (reason !== null) return this._unavailable(reason, 'API key not found')
    const i = this._locate(apiKey)
    if (typeof i !== 'number') return i
    let changed
    try {
      changed = this._native.admit(i, admission)
    } catch (e) {
      return failure(messageOf(e))
    }
    this._refresh(i)
    return { success: true, metadata: { changed } }
  }

  async resetAllLimits() {
    const reason = this._ready()
    if (reason !== null) return failure(reason)
    this._native.resetAllLimits()
    this._allStatuses()
    return { success: true, metadata: { totalKeys: this._keys.length } }
  }

  async refreshCache() {
    const reason = this._ready()
    if (reason !== null) return failure(reason)
    const availableKeys = this._native.refreshCache()
    return { success: true, metadata: { cacheRefreshed: true, availableKeys } }
  }

  /**
   * Usage statistics over `startDate`..`endDate` (both optional and included; a Date, an ISO-8601
   * string or epoch milliseconds), computed from the usage collection while MongoDB is connected,
   * else from the in-memory log of recent calls: `data` has one entry per key (masked) with the
   * SPEC's usage-stats fields plus requests, successes, failures, errorRate, tokens,
   * p50ResponseTime and p95ResponseTime; `metadata` has the range, `source`, `truncated` and the
   * `totals`. The same as `GET /api/keys/usage-stats`.
   */
  async getUsageStats({ startDate, endDate } = {}) {
    const reason = this._ready()
    if (reason !== null) return failure(reason)
    const given = {}
    for (const [name, value] of [
      ['startDate', startDate],
      ['endDate', endDate],
    ]) {
      if (value === undefined || value === null) continue
      if (value instanceof Date) {
        if (Number.isNaN(value.getTime())) return failure(`Invalid ${name}: an invalid Date`)
        given[name] = value.toISOString()
      } else if (typeof value === 'string' || typeof value === 'number') {
        given[name] = String(value)
      } else {
        return failure(`Invalid ${name}: give a Date, an ISO-8601 string or epoch milliseconds`)
      }
    }
    try {
      // The route table's own answer, as objects: one implementation of the statistics.
      const stats = await this._native.usageStats(given.startDate, given.endDate)
      return { success: true, data: stats.data, metadata: stats.metadata }
    } catch (e) {
      return failure(messageOf(e))
    }
  }

  /**
   * The pool's metrics as a plain object (shape in index.d.ts): keys handed out, selection
   * cache hits, rotations, 429s reported, recorded calls, keys by state, and every key's
   * availability score and window use. Throws when the manager cannot be built or is closed.
   */
  getMetrics() {
    const reason = this._ready()
    if (reason !== null) throw new Error(reason)
    return this._native.metrics()
  }

  /** The same metrics in the Prometheus text exposition format (what `GET /metrics` serves). */
  getMetricsText() {
    const reason = this._ready()
    if (reason !== null) throw new Error(reason)
    return this._native.metricsText()
  }

  /**
   * Runs one Gemini call with a key from the pool: picks a key (reserving `estimatedTokens`),
   * calls `call(apiKey)`, records the outcome with the tokens the result's `usageMetadata` reports
   * and the latency, and on a 429, 500 or 503 moves to another key and tries again after a short
   * back-off. When every key is busy it waits for the next free one, up to `maxWaitMs`. Rejects
   * with the last error when `maxAttempts` or the available keys run out.
   * @template T
   * @param {(apiKey: string) => Promise<T>} call
   * @param {{ estimatedTokens?: number, maxAttempts?: number, maxWaitMs?: number }} [options]
   * @returns {Promise<T>}
   */
  async execute(call, { estimatedTokens = 0, maxAttempts = 3, maxWaitMs = 0, model } = {}) {
    if (typeof call !== 'function') throw new TypeError('execute needs a function (apiKey) => Promise')
    if (!(Number.isInteger(maxAttempts) && maxAttempts >= 1)) {
      throw new RangeError(`maxAttempts must be a positive integer (got ${shown(maxAttempts)})`)
    }
    if (!(typeof maxWaitMs === 'number' && maxWaitMs >= 0 && !Number.isNaN(maxWaitMs))) {
      throw new RangeError(`maxWaitMs must be a non-negative number of milliseconds (got ${shown(maxWaitMs)})`)
    }
    const waitUntil = Date.now() + maxWaitMs
    const options = model === undefined ? undefined : { model }
    let lastError
    for (let attempt = 1; attempt <= maxAttempts; attempt++) {
      let picked = this._best(estimatedTokens, options)
      while (!picked.success && picked.metadata.nextAvailableAt && picked.metadata.nextAvailableAt.getTime() <= waitUntil) {
        await sleep(Math.max(1, picked.metadata.nextAvailableAt.getTime() - Date.now()))
        picked = this._best(estimatedTokens, options)
      }
      if (!picked.success) {
        throw lastError ?? Object.assign(new Error(picked.error), { metadata: picked.metadata })
      }
      const [apiKey] = picked.data
      const started = performance.now()
      try {
        const result = await call(apiKey)
        this._recordUsage(apiKey, tokensOf(result) ?? estimatedTokens, true, undefined, performance.now() - started, options)
        return result
      } catch (error) {
        lastError = error
        const description = describeError(error)
        this._recordUsage(apiKey, 0, false, description, performance.now() - started, options)
        if (!isRetryable(description) || attempt === maxAttempts) throw error
        await sleep(Math.min(2_000, 100 * 2 ** (attempt - 1)) * (0.5 + Math.random() / 2))
      }
    }
    throw lastError
  }

  /**
   * Serves the HTTP API (SPEC section 4) from Rust, on the addon's own threads: no request waits
   * for this process's event loop. Resolves once listening; the process stays alive until
   * `server.close()`.
   */
  async serve(options) {
    const reason = this._ready()
    if (reason !== null) throw new Error(reason)
    const native = await this._native.serve(options)
    // The server runs on Rust threads that Node does not know about; this timer is what keeps
    // the process alive while it listens, as a node:http server would.
    const keepAlive = setInterval(() => {}, 1 << 30)
    let closing = null
    return {
      host: native.host,
      port: native.port,
      proxy: native.proxy,
      url: `http://${native.host.includes(':') ? `[${native.host}]` : native.host}:${native.port}`,
      close() {
        closing ??= native.close().finally(() => clearInterval(keepAlive))
        return closing
      },
    }
  }

  /**
   * The route table `serve` answers with, for the Express adapter: `route(method, url,
   * authorization, body)`, `url` relative to the mount point. A manager that cannot serve, or an
   * admin token that cannot be used, gets a router that answers 500 with the reason.
   */
  _router(adminToken) {
    let reason = this._ready()
    if (reason === null) {
      try {
        return this._native.router(adminToken)
      } catch (e) {
        reason = messageOf(e)
      }
    }
    const failed = () => errorReply(500, reason, reason)
    return { route: failed, routeAsync: async () => failed() }
  }

  /**
   * Refuses later calls; with MongoDB, resolves once everything recorded is written. Every call
   * returns the same promise, so a second caller (an exit hook and the application) also waits
   * for the last write.
   */
  close() {
    this._closing ??= this._close()
    return this._closing
  }

  async _close() {
    this._closed = true
    this._removeExitHooks()
    routing.unroute(this)
    if (instance === this) instance = null
    if (this._routeServer !== null) await this._routeServer.close()
    if (this._native !== null) this._native.close()
    if (this._storeStart !== null) {
      await this._storeStart
      await this._native.closeStore()
    }
  }
}

// The async SPEC methods resolve even when a check did not foresee a throw (the two hot methods
// catch their own): a rejection there would crash callers that, as the old service allowed, do not
// catch.
for (const name of [
  'initialize', 'getNextKeyForRotation', 'handleRateLimit', 'getRateLimitInfo', 'getAllKeysStatus', 'reactivateKey',
  'resetAllLimits', 'refreshCache', 'addKey', 'removeKey', 'disableKey', 'enableKey',
]) {
  const method = ApiKeyManagerService.prototype[name]
  Object.defineProperty(ApiKeyManagerService.prototype, name, {
    value: {
      [name](...args) {
        return method.apply(this, args).catch(unexpected)
      },
    }[name],
    writable: true,
    configurable: true,
  })
}

let instance = null

/**
 * The process's shared manager, initialized. `options` apply to the call that creates it (the first,
 * or the first after `close()`).
 */
async function getApiKeyManager(options) {
  if (instance === null) {
    instance = new ApiKeyManagerService(options)
    await instance.initialize()
  }
  return instance
}

/** Reads a request body (at most `limit` bytes) unless a body parser already has. */
function readBody(req, limit) {
  // express.json() sets req.body to {} even when it skipped a body of another type; `_body` says
  // it really parsed one.
  if (req._body === true && req.body !== undefined) {
    const body = typeof req.body === 'string' || Buffer.isBuffer(req.body) ? req.body : JSON.stringify(req.body)
    return Promise.resolve(Buffer.from(body))
  }
  const hasBody = req.headers['transfer-encoding'] !== undefined || (req.headers['content-length'] ?? '0') !== '0'
  if (req.readableEnded || !hasBody) return Promise.resolve(undefined)
  return new Promise((resolve, reject) => {
    const chunks = []
    let size = 0
    req.on('data', (chunk) => {
      size += chunk.length
      // Past the limit the rest is read and dropped, so the 400 reaches the client instead of a reset.
      if (size <= limit) chunks.push(chunk)
    })
    req.on('end', () => {
      if (size > limit) reject(Object.assign(new Error('Request body too large'), { status: 400 }))
      else resolve(Buffer.concat(chunks))
    })
    req.on('error', reject)
  })
}

/**
 * The HTTP API as a middleware for Express (or any `(req, res, next)` stack):
 * `app.use('/api/keys', keyRoutes())`. It answers through the same Rust route table as `serve()`,
 * admin auth included: `options.adminToken`, else KEY_MANAGER_ADMIN_TOKEN. `manager` defaults to
 * the process's shared manager.
 */
function keyRoutes(manager, options) {
  const adminToken = keyRoutesAdminToken(options)
  // One native router per manager (the shared one is replaced after close()).
  let routerOf = null
  let router = null
  return function keyManagerRoutes(req, res, next) {
    const managerReady = manager ? Promise.resolve(manager) : getApiKeyManager()
    Promise.all([managerReady, readBody(req, DEFAULT_MAX_BODY_BYTES)])
      .then(([m, body]) => {
        if (routerOf !== m) {
          router = m._router(adminToken)
          routerOf = m
        }
        const header = req.headers.authorization
        const authorization = typeof header === 'string' ? header : undefined
        const reply = router.route(req.method, req.url, authorization, body)
        // Usage statistics read MongoDB: answered off the JS thread.
        return reply.deferred ? router.routeAsync(req.method, req.url, authorization) : reply
      })
      .then((reply) => {
        res.statusCode = reply.status
        for (const [name, value] of Object.entries(reply.headers)) res.setHeader(name, value)
        res.end(reply.body)
      })
      .catch((e) => {
        if (e && e.status === 400) {
          const reply = errorReply(400, e.message, 'The request could not be read')
          res.statusCode = reply.status
          for (const [name, value] of Object.entries(reply.headers)) res.setHeader(name, value)
          res.end(reply.body)
        } else if (typeof next === 'function') next(e)
        else res.destroy(e)
      })
  }
}

module.exports = { ApiKeyManagerService, getApiKeyManager, keyRoutes, keyFingerprint }
