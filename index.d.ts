// Types of gemini-key-manager's JS API: the old apiKeyManager.ts surface (SPEC section 1), so code
// written against the old service type-checks unchanged.
// The shapes the native side builds as they are (metrics, what the MongoDB writer reports) come from
// the generated binding.d.ts, which, like this file, needs no @types/node; this file writes what the
// JS face adds, narrows or builds itself, and the options (the native side reads them as plain
// values and checks them, so their shapes are written here).

import type {
  BudgetUse,
  KeyUsageStats as NativeKeyUsageStats,
  KeyUse,
  Metrics as NativeMetrics,
  PersistenceStats,
  UsageFigures,
  UsageStatsMetadata as NativeUsageStatsMetadata,
  WindowUse,
} from './binding'

export type { BudgetUse, KeyUse, PersistenceStats, UsageFigures, WindowUse }

/**
 * Every method resolves to this; failures are returned, never thrown. A selection that fails only
 * because every key is busy has `metadata.nextAvailableAt`: when a key frees.
 */
export interface ServiceResponse<T> {
  success: boolean
  data?: T
  error?: string
  metadata: Record<string, any>
}

/** One window of one limit. */
export interface LimitWindow {
  current: number
  limit: number
  /** When the window's count next drops to zero. */
  resetTime: Date
}

export interface ApiKeyLimit {
  rpm: LimitWindow
  rpd: LimitWindow
  tpm: LimitWindow
}

/**
 * A key's status. The manager keeps one object per key and updates it whenever this process's calls
 * touch the key (and for every key on `getAllKeysStatus`), as the old service's objects were.
 */
export interface ApiKeyStatus {
  apiKey: string
  /**
   * False for a key the API refused (API_KEY_INVALID, PERMISSION_DENIED, 401/403), until
   * `reactivateKey`, and for a key an operator disabled, until `enableKey`.
   */
  isActive: boolean
  lastUsed: Date
  limits: ApiKeyLimit
  /** Failures in a row, of any kind. */
  errorCount: number
  lastError?: string
  lastErrorTime?: Date
  /** Whether the key is served: resting after a 429, circuit open after repeated server errors, ... */
  state: KeyState
  /** Until when a resting or circuit-open key is kept out. */
  stateUntil?: Date
  /**
   * The key's project (`null`: not known, a project of its own). Set by `getAllKeysStatus`; keys of
   * one project share its budgets.
   */
  project?: string | null
  /** Its project's budget of every model met, by model name. Set by `getAllKeysStatus`. */
  models?: Record<string, ModelBudget>
}

/**
 * - `active`: served.
 * - `resting`: a 429 (per minute until its window frees, per day until the daily reset).
 * - `no-quota`: the project's tier has no quota for the model (a 429 with `quotaValue` "0"), until reactivated.
 * - `overloaded`: the model answered 503/500 and backs off, with one probe at a time.
 */
export type BudgetState = 'active' | 'resting' | 'no-quota' | 'overloaded'

/** What Gemini counts: one (project, model) budget, shared by the project's keys. */
export interface ModelBudget {
  state: BudgetState
  /** Until when it rests, or its model backs off; null when neither. */
  stateUntil: Date | null
  availabilityScore: number
  rpm: LimitWindow
  rpd: LimitWindow
  tpm: LimitWindow
}

/**
 * - `active`: served.
 * - `resting`: rate-limited upstream (429); served again when its window frees or after Gemini's `retryDelay`.
 * - `circuit-open`: 3 failures in a row (500, 503, timeouts); rests for a back-off that doubles each time (5 s to 5 min).
 * - `half-open`: the back-off is over; one trial request decides whether it is `active` again.
 * - `deactivated`: the API refused the key; only `reactivateKey` brings it back.
 * - `disabled`: an operator took it out of service (`disableKey`, `POST /api/keys/disable/:apiKey`) until `enableKey`.
 * - `no-quota`: its project's tier has no quota for the default model (a 429 with `quotaValue` "0"), until `reactivateKey`.
 */
export type KeyState = 'active' | 'resting' | 'circuit-open' | 'half-open' | 'deactivated' | 'disabled' | 'no-quota'

export interface ApiKeyManager {
  keys: ApiKeyStatus[]
  currentIndex: number
  totalKeys: number
  lastRotation: Date
}

export type LimitType = 'RPM' | 'RPD' | 'TPM'

export interface RateLimitInfo {
  type: LimitType
  current: number
  limit: number
  resetTime: Date
  isLimited: boolean
}

export interface ApiKeyUsage {
  apiKey: string
  timestamp: Date
  tokensUsed: number
  success: boolean
  error?: string
  responseTime: number
}

/** How `getBestAvailableKey` picked: from a fresh cache, or after rebuilding it. */
export type RotationMethod = 'cached-round-robin' | 'round-robin'

/** Why `getNextKeyForRotation` did or did not move to another key. */
export type RotationReason = 'proactive-rotation' | 'not-needed' | 'no-key-above-threshold'

/** Per-key limits; each falls back to `GEMINI_RPM_LIMIT` / `GEMINI_RPD_LIMIT` / `GEMINI_TPM_LIMIT`, then 30 / 200 / 1,000,000. */
export interface LimitsOptions {
  rpm?: number
  rpd?: number
  tpm?: number
}

/** A key with the Google Cloud project it belongs to: the keys of one project share its quota. */
export interface KeySpec {
  apiKey: string
  project?: string | null
}

export interface ApiKeyManagerOptions {
  /**
   * The keys, each a string or `{ apiKey, project }`; without it, `GEMINI_API_KEY_1..N` (up to the
   * first gap, each with an optional `GEMINI_API_KEY_<n>_PROJECT`) and `GEMINI_API_KEYS`
   * (comma-separated, `key` or `project:key`). A key without a project is a project of its own.
   */
  keys?: Array<string | KeySpec>
  /**
   * The model whose free-tier limits apply (`GEMINI_MODEL`; default `gemini-2.0-flash-lite`, 30 / 200 / 1,000,000).
   * Known: gemini-2.0-flash-lite, gemini-2.0-flash, gemini-2.5-flash-lite, gemini-2.5-flash, gemini-2.5-pro.
   */
  model?: string
  /** Limits by model name, replacing or adding to the built-in table. */
  modelLimits?: Record<string, LimitsOptions>
  /** Overrides of the chosen model's limits. */
  limits?: LimitsOptions
  /** Span of the rolling RPM and TPM windows in ms (`GEMINI_WINDOW_MS`, default 60000). */
  windowMs?: number
  /** When RPD resets: `'America/Los_Angeles'` midnight (default, as Gemini) or `'UTC'` (`GEMINI_DAILY_RESET`). */
  dailyReset?: 'America/Los_Angeles' | 'UTC'
  /** How long a key handed out stays reserved without a `recordUsage` (default 60000 ms). */
  reservationTtlMs?: number
  /** Suppresses the log lines. */
  quiet?: boolean
  /**
   * MongoDB connection string (`MONGODB_URI`). With one, state is kept in SPEC section 3's
   * collections, written behind; without one, or while the server cannot be reached, in memory.
   */
  mongodbUri?: string
  /** Database name (`MONGODB_DB_NAME`, default `rag_db`). */
  mongodbDbName?: string
  /** How long start-up waits for MongoDB before running in memory (default 2000 ms). */
  mongoConnectTimeoutMs?: number
  /** How often changes are written to MongoDB (default 1000 ms): at most this much is lost in a crash. */
  flushIntervalMs?: number
  /** How often a manager running in memory tries MongoDB again (default 3000 ms). */
  mongoRetryIntervalMs?: number
  /** Recorded calls that trigger a write before `flushIntervalMs` is up (default 500). */
  usageBatchSize?: number
  /**
   * Recorded calls kept for MongoDB at most while it is away or slower than the calls come (default
   * 10,000); past that the oldest usage documents are dropped (and counted). Key documents never are.
   */
  usageQueueCapacity?: number
  /**
   * With MongoDB: share each key's RPM and RPD with every process and host using the same database
   * and keys, so that together they never hand out more than a key's limit in a window
   * (`KEY_MANAGER_SHARED_QUOTA`, default true). See the README's "One quota across processes".
   */
  sharedQuota?: boolean
  /**
   * MongoDB documents name keys by their SHA-256 digest (`sha256_` + 32 hex digits) unless this
   * secret is set (at least 16 bytes; `KEY_MANAGER_FINGERPRINT_SECRET`): then by a keyed fingerprint
   * (HMAC-SHA256, `fp_` + 32 hex digits), and keys added at run time are stored sealed under it, so
   * every process sharing the database gets them. Without a secret, `addKey` fails with MongoDB.
   */
  fingerprintSecret?: string
  /**
   * Store keys in plaintext, as the old service did (`KEY_MANAGER_STORE_PLAINTEXT_KEYS=true`); only
   * for deployments that still need the old documents. Default false.
   */
  storePlaintextKeys?: boolean
  /** Recorded calls kept in memory for usage statistics without MongoDB (default 10,000; 0 keeps none). */
  usageLogCapacity?: number
  /**
   * With MongoDB: how often the keys other processes added, removed, disabled or enabled are read
   * (default 2000 ms).
   */
  keySyncIntervalMs?: number
  /**
   * With MongoDB: how long `close()` (and SIGINT, SIGTERM, the process's end) waits for the database
   * before keeping what it did not take in a spill file, written at the next start (default 3000 ms).
   */
  closeTimeoutMs?: number
  /** Where spill files go (`KEY_MANAGER_SPILL_DIR`; default the system's temporary directory). */
  spillDir?: string
  /**
   * Route the app's own Gemini SDK requests (over the global `fetch`: `@google/generative-ai`,
   * LangChain's `ChatGoogleGenerativeAI`, `@google/genai`) that carry one of this manager's keys
   * through the pool: the best key with room at the moment each is sent, waiting for room rather
   * than meeting a 429, retried on 429 and 503, counted once, sent to `GEMINI_BASE_URL` when set
   * (`KEY_MANAGER_ROUTE_REQUESTS`, default true). See the README's "The app's own Gemini calls".
   */
  routeRequests?: boolean
  /**
   * How long a routed request may wait for a key with room (default 60000 ms); one that would wait
   * longer is answered at once with Google's 429 and a `RetryInfo` of when room frees.
   */
  routeMaxWaitMs?: number
  /**
   * Re-test the keys deactivated because Gemini refused them this often (default: never; also
   * `KEY_MANAGER_REVALIDATE_INTERVAL_MS`), with `GET /v1beta/models/{model}` at `GEMINI_BASE_URL`,
   * which spends no generation quota; a key Gemini accepts again is back in service. Logged both
   * ways (a refusal once per key).
   */
  revalidateIntervalMs?: number
}

/** The range of `getUsageStats`: both ends optional and included. */
export interface UsageStatsRange {
  /** A Date, an ISO-8601 string (`2026-11-27`, `2026-11-27T20:30:42.123Z`) or epoch milliseconds. */
  startDate?: Date | string | number
  endDate?: Date | string | number
}

/**
 * One key's usage statistics: the SPEC's fields (current windows as `'current/limit'`) plus the
 * range's figures; the shape the native side builds (binding.d.ts), its budgets' states narrowed.
 */
export interface KeyUsageStats extends Omit<NativeKeyUsageStats, 'models'> {
  /** Its project's budget of every model met, by model name. */
  models: Record<string, ModelBudget>
}

/** The range, where the calls were read, and the totals; `source` narrowed to the names it takes. */
export interface UsageStatsMetadata extends Omit<NativeUsageStatsMetadata, 'source'> {
  /** Where the calls were read: the usage collection, or the in-memory log (no MongoDB, or it failed). */
  source: 'mongodb' | 'memory'
}

/**
 * `getMetrics()`: counters since the manager started, and every key and budget now; the shapes
 * the native side builds (binding.d.ts), with their states narrowed to the names they take.
 */
export interface Metrics extends Omit<NativeMetrics, 'keysByState' | 'keys' | 'budgets'> {
  keysByState: Record<KeyState, number>
  keys: Array<KeyUse & { state: KeyState }>
  budgets: Array<BudgetUse & { state: BudgetState }>
}

/** Which model's budget a call counts in. */
export interface ModelOption {
  /**
   * The model (`gemini-2.5-flash`, `models/gemini-2.5-flash`); its limits from the built-in table
   * or `modelLimits`, an unknown one `limits` (warned once). Default: the configured `model`.
   */
  model?: string
}

export interface SelectionOptions extends ModelOption {
  /** Tokens the call is expected to use: reserved on the key's TPM until `recordUsage` reports the real count. */
  estimatedTokens?: number
}

export interface ExecuteOptions extends SelectionOptions {
  /** Calls made at most, each on the best key available then (default 3). */
  maxAttempts?: number
  /** When every key is busy, wait up to this long for the next free one (default 0: fail at once). */
  maxWaitMs?: number
}

export interface ServeOptions {
  /**
   * An IP address, bound exactly, or `'localhost'` (the default): 127.0.0.1 and ::1 both, as
   * `http://localhost:3001` may resolve to either.
   */
  host?: string
  /** Default 3001; 0 picks a free port. */
  port?: number
  /** One line per request on stdout, keys masked. */
  accessLog?: boolean
  /** Largest request body accepted (default 64 KiB). */
  maxBodyBytes?: number
  /**
   * The bearer token that rotate, refresh-cache, reactivate and reset-limits want
   * (`Authorization: Bearer <token>`; visible ASCII, no spaces). Default: `KEY_MANAGER_ADMIN_TOKEN`;
   * with neither, those endpoints are open.
   */
  adminToken?: string
  /**
   * Listen on a non-loopback address without an admin token (default: `KEY_MANAGER_ALLOW_INSECURE`,
   * else false: such a `serve()` rejects).
   */
  allowInsecure?: boolean
  /**
   * Connections open at once, at most (default 4096). Past it a new connection takes the place of
   * the oldest one that has not sent a whole request yet; when every open one has, it is refused
   * at once (503).
   */
  maxConnections?: number
  /** How long a connection may take to send a whole request head before it is closed (default 10000 ms). */
  headTimeoutMs?: number
  /**
   * Serve the Gemini proxy (`/v1beta/...`, `/v1/...`, `/v1beta/openai/...`) to clients presenting
   * one of these as their API key (`x-goog-api-key`, `?key=` or `Authorization: Bearer`). Default:
   * `KEY_MANAGER_PROXY_TOKENS`, comma-separated; with neither, the proxy routes are off unless
   * `proxyOpen`.
   */
  proxyTokens?: string[]
  /** Without tokens, serve the proxy routes to anyone: loopback only (default `KEY_MANAGER_PROXY_OPEN`, else false). */
  proxyOpen?: boolean
  /** Largest request body the proxy sends on (default 20 MiB); a larger one gets a 413. */
  proxyMaxBodyBytes?: number
  /** How long a connection to Gemini may take (default 10000 ms); past it the client gets a 504. */
  upstreamConnectTimeoutMs?: number
  /** How long Gemini may take to start answering (default 300000 ms); past it a 504. */
  upstreamFirstByteTimeoutMs?: number
  /**
   * How long Gemini may pause between chunks of an answer (default 120000 ms): a 504 before its
   * first chunk went to the client, the stream cut after.
   */
  upstreamChunkTimeoutMs?: number
}

export interface KeyRoutesOptions {
  /** As `ServeOptions.adminToken`: default `KEY_MANAGER_ADMIN_TOKEN`. */
  adminToken?: string
}

export interface KeyServer {
  host: string
  port: number
  /** Whether it serves the Gemini proxy routes (proxy tokens set, or `proxyOpen`). */
  proxy: boolean
  /** `http://host:port` */
  url: string
  /** Stops accepting, lets in-flight requests finish (5 s at most). */
  close(): Promise<void>
}

export declare class ApiKeyManagerService {
  constructor(options?: ApiKeyManagerOptions)
  /**
   * Loads the keys, and with MongoDB the stored state. Safe to call again; metadata `{ totalKeys }`
   * when connected to MongoDB, `{ totalKeys, mode: 'in-memory' }` otherwise.
   */
  initialize(): Promise<ServiceResponse<ApiKeyManager>>
  /** What the MongoDB writer has done; null without MongoDB. */
  persistenceStats(): PersistenceStats | null
  /**
   * Usage statistics over a range: from the usage collection while MongoDB is connected, else from
   * the in-memory log of recent calls. The same as `GET /api/keys/usage-stats`; a bad date fails
   * with `Invalid startDate`, `Invalid endDate` or `Invalid date range`.
   */
  getUsageStats(range?: UsageStatsRange): Promise<ServiceResponse<KeyUsageStats[]> & { metadata: UsageStatsMetadata }>
  /** The metrics as a plain object; throws when the manager cannot be built or is closed. */
  getMetrics(): Metrics
  /** The metrics in the Prometheus text exposition format, as `GET /metrics` serves them. */
  getMetricsText(): string
  /**
   * The next available key, round-robin over a 5-second cache sorted by availability score. The
   * request is counted on the key at once (the `recordUsage` that follows settles it), so concurrent
   * callers never share a key's last request; unsettled reservations expire after `reservationTtlMs`.
   */
  getBestAvailableKey(options?: SelectionOptions): Promise<ServiceResponse<[string, ApiKeyStatus]>>
  /**
   * Like `getBestAvailableKey`, but moves off a key whose score fell under 0.3. `metadata.rotationReason`
   * is `'proactive-rotation'` or why it did not rotate.
   */
  getNextKeyForRotation(options?: SelectionOptions): Promise<ServiceResponse<[string, ApiKeyStatus]>>
  /**
   * Records a call's outcome; `tokensUsed` is a non-negative integer (ignored when missing on a
   * failure). A failure's `error` (a message, or the SDK's error object) is read: a 429 rests the
   * key, a refused key is deactivated, other failures count toward opening its circuit.
   */
  recordUsage(
    apiKey: string,
    tokensUsed: number,
    success: boolean,
    error?: unknown,
    responseTime?: number,
    /** Without a model, the key's oldest open hand-out is settled, whatever its model. */
    options?: ModelOption,
  ): Promise<ServiceResponse<void>>
  /**
   * After a 429 from Gemini: the key rests until that window frees, or for `retryAfterMs` (Gemini's
   * `retryDelay`). Never counts toward deactivation.
   */
  handleRateLimit(apiKey: string, limitType: LimitType, options?: { retryAfterMs?: number } & ModelOption): Promise<ServiceResponse<void>>
  /** The windows of the key's project for the model (the default one without). */
  getRateLimitInfo(apiKey: string, options?: ModelOption): Promise<ServiceResponse<RateLimitInfo[]>>
  getAllKeysStatus(): Promise<ServiceResponse<ApiKeyStatus[]>>
  reactivateKey(apiKey: string): Promise<ServiceResponse<void>>
  resetAllLimits(): Promise<ServiceResponse<void>>
  refreshCache(): Promise<ServiceResponse<void>>
  /**
   * Adds a key at run time (or brings back a removed one); `data` is its status. With MongoDB every
   * process sharing the database takes it in within a few seconds (stored sealed: needs
   * `fingerprintSecret`). Fails with `API key already exists`, `Invalid API key: <why>` (a key is 1
   * to 512 visible ASCII characters without `,` or `:`) or `API key cannot be stored: <why>`.
   */
  addKey(apiKey: string, options?: { project?: string }): Promise<ServiceResponse<ApiKeyStatus>>
  /** Takes a key out of the pool; its usage history stays. `metadata.changed` says whether it was in. */
  removeKey(apiKey: string): Promise<ServiceResponse<void>>
  /** Takes a key out of service (`state: 'disabled'`) until `enableKey`. */
  disableKey(apiKey: string): Promise<ServiceResponse<void>>
  /** Puts a disabled key back into service. */
  enableKey(apiKey: string): Promise<ServiceResponse<void>>
  /**
   * Runs one Gemini call with a pooled key: picks a key (reserving `estimatedTokens`), awaits
   * `call(apiKey)`, records tokens (from the result's `usageMetadata.totalTokenCount` when present)
   * and latency, and on a 429, 500 or 503 moves to another key after a short back-off. When every
   * key is busy it waits for the next free one, up to `maxWaitMs`. Rejects with the last error when
   * `maxAttempts` or the keys run out.
   */
  execute<T>(call: (apiKey: string) => Promise<T>, options?: ExecuteOptions): Promise<T>
  /** Serves the HTTP API from Rust threads; the process stays alive until `close()`. */
  serve(options?: ServeOptions): Promise<KeyServer>
  /** Every later call fails with 'API key manager is closed'; with MongoDB, resolves once everything recorded is written. */
  close(): Promise<void>
}

/**
 * The HTTP API as Express (or any `(req, res, next)`) middleware, answered by the same Rust route
 * table as `serve()`, admin auth included: `app.use('/api/keys', keyRoutes())`. Defaults to the
 * shared manager.
 */
export declare function keyRoutes(manager?: ApiKeyManagerService, options?: KeyRoutesOptions): KeyRoutesMiddleware

/** What the middleware uses of node:http's request and response (Express's extend them), so these types need no @types/node. */
export type KeyRoutesMiddleware = (
  req: { method?: string; url?: string; headers: Record<string, string | string[] | undefined>; on(event: string, listener: (...args: any[]) => void): unknown },
  res: { statusCode: number; setHeader(name: string, value: string): unknown; end(body?: string): unknown; destroy(err?: unknown): unknown },
  next?: (err?: unknown) => void,
) => void

/**
 * The name MongoDB documents store for `apiKey`: `fp_` + 32 hex digits (HMAC-SHA256 under `secret`,
 * default `KEY_MANAGER_FINGERPRINT_SECRET`, cut to 128 bits), or with no secret `sha256_` + 32 hex
 * digits (its SHA-256 digest). Throws for a secret shorter than 16 bytes.
 */
export declare function keyFingerprint(apiKey: string, secret?: string): string

/** The process's shared manager, initialized; `options` apply to the call that creates it. */
export declare function getApiKeyManager(options?: ApiKeyManagerOptions): Promise<ApiKeyManagerService>
