// Types of gemini-key-manager's JS API: the old apiKeyManager.ts surface (SPEC section 1), so code
// written against the old service type-checks unchanged.

/** Every method resolves to this; failures are returned, never thrown. */
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
  isActive: boolean
  lastUsed: Date
  limits: ApiKeyLimit
  errorCount: number
  lastError?: string
  lastErrorTime?: Date
}

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

export interface ApiKeyManagerOptions {
  /** The keys; without it, `GEMINI_API_KEY_1..N` (up to the first gap) and `GEMINI_API_KEYS` (comma-separated). */
  keys?: string[]
  limits?: LimitsOptions
  /** Suppresses the log lines. */
  quiet?: boolean
}

export declare class ApiKeyManagerService {
  constructor(options?: ApiKeyManagerOptions)
  /** Loads the keys. Safe to call again; metadata `{ totalKeys, mode: 'in-memory' }`. */
  initialize(): Promise<ServiceResponse<ApiKeyManager>>
  /** The next available key, round-robin over a 5-second cache sorted by availability score. */
  getBestAvailableKey(): Promise<ServiceResponse<[string, ApiKeyStatus]>>
  /** Like `getBestAvailableKey`, but moves off a key whose score fell under 0.3; metadata `rotationReason`. */
  getNextKeyForRotation(): Promise<ServiceResponse<[string, ApiKeyStatus]>>
  /** Records a call's outcome; `tokensUsed` is a non-negative integer. */
  recordUsage(
    apiKey: string,
    tokensUsed: number,
    success: boolean,
    error?: string,
    responseTime?: number,
  ): Promise<ServiceResponse<void>>
  /** After a 429 from Gemini: marks that window as used up. */
  handleRateLimit(apiKey: string, limitType: LimitType): Promise<ServiceResponse<void>>
  getRateLimitInfo(apiKey: string): Promise<ServiceResponse<RateLimitInfo[]>>
  getAllKeysStatus(): Promise<ServiceResponse<ApiKeyStatus[]>>
  reactivateKey(apiKey: string): Promise<ServiceResponse<void>>
  resetAllLimits(): Promise<ServiceResponse<void>>
  refreshCache(): Promise<ServiceResponse<void>>
  /** Every later call fails with 'API key manager is closed'. */
  close(): Promise<void>
}

/** The process's shared manager, initialized; `options` apply to the call that creates it. */
export declare function getApiKeyManager(options?: ApiKeyManagerOptions): Promise<ApiKeyManagerService>
