'use strict'

// The old service (apiKeyManager.ts) in memory mode, restated in plain JS for the benchmarks, call
// for call: the keys in one array, `recordUsage` and the other calls by key finding it with `find`,
// windows checked and reset (with a `new Date()`) only where the old code did (checking a key's
// availability), a 5-second cache of the available keys sorted by score handed out round-robin by
// a counter that is never reset, and the fire-and-forget database write as an `async` call that
// does nothing because the database was never connected. The benchmarks run it in the same process
// as the addon.
//
// What differs from the old file, none of it on the measured path: the keys and limits come from
// the constructor (the old one read GEMINI_API_KEY_n and fixed limits, which the benchmarks must
// raise so no key runs out), the RPM and TPM windows may be shortened for runs in simulated time,
// there is no MongoDB attempt and no `initialize` (the constructor does what the old in-memory
// fallback did), and the two console lines (deactivation, rate limit) are not printed.

const DAY = 86_400_000
const CACHE_TTL = 5000
const ROTATION_THRESHOLD = 0.3

class BaselineKeyManager {
  /**
   * @param {string[]} keys
   * @param {{ rpm: number, rpd: number, tpm: number }} [limits]
   * @param {{ windowMs?: number }} [options] span of the RPM and TPM windows: a minute, as the old
   *   service's, or shorter for a run in simulated time (`npm run bench:gemini`)
   */
  constructor(keys, limits = { rpm: 30, rpd: 200, tpm: 1_000_000 }, { windowMs = 60_000 } = {}) {
    this.windowMs = windowMs
    this.limits = limits
    // Stays false in memory mode: it gates every database write.
    this.isInitialized = false
    this.manager = { keys: [], currentIndex: 0, totalKeys: 0, lastRotation: new Date() }
    this.currentKeyIndex = 0
    this.availableKeysCache = []
    this.lastCacheUpdate = 0
    for (const apiKey of keys) {
      this.manager.keys.push({ apiKey, isActive: true, lastUsed: new Date(), limits: this.createInitialLimits(), errorCount: 0 })
    }
    this.manager.totalKeys = this.manager.keys.length
  }

  createInitialLimits() {
    const now = new Date()
    return {
      rpm: { current: 0, limit: this.limits.rpm, resetTime: new Date(now.getTime() + this.windowMs) },
      rpd: { current: 0, limit: this.limits.rpd, resetTime: new Date(now.getTime() + DAY) },
      tpm: { current: 0, limit: this.limits.tpm, resetTime: new Date(now.getTime() + this.windowMs) },
    }
  }

  async getBestAvailableKey() {
    try {
      const now = Date.now()
      if (now - this.lastCacheUpdate < CACHE_TTL && this.availableKeysCache.length > 0) {
        const keyStatus = this.availableKeysCache[this.currentKeyIndex % this.availableKeysCache.length]
        if (this.isKeyAvailable(keyStatus)) {
          this.currentKeyIndex++
          keyStatus.lastUsed = new Date()
          this.updateKeyStatusAsync(keyStatus)
          return {
            success: true,
            data: [keyStatus.apiKey, keyStatus],
            metadata: {
              availabilityScore: this.calculateAvailabilityScore(keyStatus),
              totalAvailable: this.availableKeysCache.length,
              rotationMethod: 'cached-round-robin',
            },
          }
        }
      }
      await this.refreshAvailableKeysCache()
      if (this.availableKeysCache.length === 0) throw new Error('No active API keys available')
      const keyStatus = this.availableKeysCache[this.currentKeyIndex % this.availableKeysCache.length]
      this.currentKeyIndex++
      keyStatus.lastUsed = new Date()
      this.updateKeyStatusAsync(keyStatus)
      return {
        success: true,
        data: [keyStatus.apiKey, keyStatus],
        metadata: {
          availabilityScore: this.calculateAvailabilityScore(keyStatus),
          totalAvailable: this.availableKeysCache.length,
          rotationMethod: 'round-robin',
        },
      }
    } catch (error) {
      return { success: false, error: error.message, metadata: {} }
    }
  }

  async refreshAvailableKeysCache() {
    const available = this.manager.keys.filter((key) => key.isActive && this.isKeyAvailable(key))
    available.sort((a, b) => this.calculateAvailabilityScore(b) - this.calculateAvailabilityScore(a))
    this.availableKeysCache = available
    this.lastCacheUpdate = Date.now()
  }

  /** Resets the windows whose time has come, then: is there room in all three? (Not whether it is active.) */
  isKeyAvailable(keyStatus) {
    const limits = keyStatus.limits
    const now = new Date()
    if (now >= limits.rpm.resetTime) {
      limits.rpm.current = 0
      limits.rpm.resetTime = new Date(now.getTime() + this.windowMs)
    }
    if (now >= limits.rpd.resetTime) {
      limits.rpd.current = 0
      limits.rpd.resetTime = new Date(now.getTime() + DAY)
    }
    if (now >= limits.tpm.resetTime) {
      limits.tpm.current = 0
      limits.tpm.resetTime = new Date(now.getTime() + this.windowMs)
    }
    return limits.rpm.current < limits.rpm.limit && limits.rpd.current < limits.rpd.limit && limits.tpm.current < limits.tpm.limit
  }

  /** The fire-and-forget write: without a database, an async call that does nothing. */
  async updateKeyStatusAsync(keyStatus) {
    if (this.isInitialized) this.updateKeyStatus(keyStatus).catch(() => {})
  }

  // The database writes, for a subclass with a database to fill in; here never reached.
  async updateKeyStatus() {}

  async insertUsage() {}

  calculateAvailabilityScore(keyStatus) {
    const { rpm, rpd, tpm } = keyStatus.limits
    const rpmScore = Math.max(0, rpm.limit - rpm.current) / rpm.limit
    const rpdScore = Math.max(0, rpd.limit - rpd.current) / rpd.limit
    const tpmScore = Math.max(0, tpm.limit - tpm.current) / tpm.limit
    return rpmScore * 0.5 + rpdScore * 0.3 + tpmScore * 0.2
  }

  /** As the old one: a key it does not know is not an error, only not counted. */
  async recordUsage(apiKey, tokensUsed, success, error, responseTime) {
    try {
      if (this.isInitialized) {
        this.insertUsage({ apiKey, timestamp: new Date(), tokensUsed, success, error, responseTime: responseTime || 0 }).catch(() => {})
      }
      const keyStatus = this.manager.keys.find((k) => k.apiKey === apiKey)
      if (keyStatus) {
        if (success) {
          keyStatus.limits.rpm.current++
          keyStatus.limits.rpd.current++
          keyStatus.limits.tpm.current += tokensUsed
          keyStatus.errorCount = 0
          keyStatus.lastError = undefined
          keyStatus.lastErrorTime = undefined
        } else {
          keyStatus.errorCount++
          keyStatus.lastError = error
          keyStatus.lastErrorTime = new Date()
          if (keyStatus.errorCount >= 5) {
            keyStatus.isActive = false
            this.availableKeysCache = []
          }
        }
        this.updateKeyStatusAsync(keyStatus)
      }
      return { success: true, data: undefined, metadata: {} }
    } catch (e) {
      return { success: false, error: e.message, metadata: {} }
    }
  }

  /** Marks the window full and counts an error (which, here, never deactivates), drops the cache. */
  async handleRateLimit(apiKey, limitType) {
    try {
      const keyStatus = this.manager.keys.find((k) => k.apiKey === apiKey)
      if (!keyStatus) throw new Error('API key not found')
      const limit = keyStatus.limits[limitType.toLowerCase()]
      limit.current = limit.limit
      keyStatus.errorCount++
      keyStatus.lastError = `${limitType} rate limit exceeded`
      keyStatus.lastErrorTime = new Date()
      this.availableKeysCache = []
      this.updateKeyStatusAsync(keyStatus)
      return { success: true, data: undefined, metadata: {} }
    } catch (e) {
      return { success: false, error: e.message, metadata: {} }
    }
  }

  async getRateLimitInfo(apiKey) {
    try {
      const keyStatus = this.manager.keys.find((k) => k.apiKey === apiKey)
      if (!keyStatus) throw new Error('API key not found')
      const info = (type, w) => ({ type, current: w.current, limit: w.limit, resetTime: w.resetTime, isLimited: w.current >= w.limit })
      const { rpm, rpd, tpm } = keyStatus.limits
      return { success: true, data: [info('RPM', rpm), info('RPD', rpd), info('TPM', tpm)], metadata: {} }
    } catch (e) {
      return { success: false, error: e.message, metadata: {} }
    }
  }

  async getAllKeysStatus() {
    return { success: true, data: this.manager.keys, metadata: { totalKeys: this.manager.totalKeys } }
  }

  async reactivateKey(apiKey) {
    try {
      const keyStatus = this.manager.keys.find((k) => k.apiKey === apiKey)
      if (!keyStatus) throw new Error('API key not found')
      keyStatus.isActive = true
      keyStatus.errorCount = 0
      keyStatus.lastError = undefined
      keyStatus.lastErrorTime = undefined
      await this.updateKeyStatus(keyStatus)
      return { success: true, data: undefined, metadata: {} }
    } catch (e) {
      return { success: false, error: e.message, metadata: {} }
    }
  }

  async resetAllLimits() {
    for (const keyStatus of this.manager.keys) {
      keyStatus.limits = this.createInitialLimits()
      await this.updateKeyStatus(keyStatus)
    }
    return { success: true, data: undefined, metadata: {} }
  }

  /** The lowest-scored available key under the threshold: another above it; else as getBestAvailableKey. */
  async getNextKeyForRotation() {
    try {
      await this.refreshAvailableKeysCache()
      if (this.availableKeysCache.length === 0) throw new Error('No active API keys available')
      const keyToRotate = this.availableKeysCache.reduce((lowest, current) =>
        this.calculateAvailabilityScore(current) < this.calculateAvailabilityScore(lowest) ? current : lowest,
      )
      const currentScore = this.calculateAvailabilityScore(keyToRotate)
      if (currentScore < ROTATION_THRESHOLD) {
        const nextKey = this.availableKeysCache.find(
          (key) => key.apiKey !== keyToRotate.apiKey && this.calculateAvailabilityScore(key) > ROTATION_THRESHOLD,
        )
        if (nextKey) {
          nextKey.lastUsed = new Date()
          this.updateKeyStatusAsync(nextKey)
          return {
            success: true,
            data: [nextKey.apiKey, nextKey],
            metadata: {
              availabilityScore: this.calculateAvailabilityScore(nextKey),
              rotationReason: 'proactive-rotation',
              previousKeyScore: currentScore,
            },
          }
        }
      }
      return this.getBestAvailableKey()
    } catch (e) {
      return { success: false, error: e.message, metadata: {} }
    }
  }

  async refreshCache() {
    this.availableKeysCache = []
    this.lastCacheUpdate = 0
    await this.refreshAvailableKeysCache()
    return { success: true, data: undefined, metadata: { cacheRefreshed: true } }
  }
}

module.exports = { BaselineKeyManager }
