'use strict'

// A plain-JS implementation of the old service's in-memory algorithm (SPEC section 2), written the
// way apiKeyManager.ts works: status objects with Date fields, windows checked and reset on every
// touch, a 5-second cache of available keys sorted by score, handed out round-robin. The benchmarks
// run it in the same process as the addon, as the baseline.

const DAY = 86_400_000
const WINDOW_OF = { RPM: 'rpm', RPD: 'rpd', TPM: 'tpm' }
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
    const now = Date.now()
    this.keys = new Map()
    for (const apiKey of keys) {
      this.keys.set(apiKey, {
        apiKey,
        isActive: true,
        lastUsed: new Date(now),
        limits: {
          rpm: { current: 0, limit: limits.rpm, resetTime: new Date(now + windowMs) },
          rpd: { current: 0, limit: limits.rpd, resetTime: new Date(now + DAY) },
          tpm: { current: 0, limit: limits.tpm, resetTime: new Date(now + windowMs) },
        },
        errorCount: 0,
      })
    }
    this.cache = null
    this.cacheTime = 0
    this.roundRobin = 0
  }

  checkAndResetLimits(status) {
    const now = new Date()
    const { rpm, rpd, tpm } = status.limits
    if (now >= rpm.resetTime) {
      rpm.current = 0
      rpm.resetTime = new Date(now.getTime() + this.windowMs)
    }
    if (now >= tpm.resetTime) {
      tpm.current = 0
      tpm.resetTime = new Date(now.getTime() + this.windowMs)
    }
    if (now >= rpd.resetTime) {
      rpd.current = 0
      rpd.resetTime = new Date(now.getTime() + DAY)
    }
  }

  score(status) {
    const { rpm, rpd, tpm } = status.limits
    return (
      0.5 * (Math.max(0, rpm.limit - rpm.current) / rpm.limit) +
      0.3 * (Math.max(0, rpd.limit - rpd.current) / rpd.limit) +
      0.2 * (Math.max(0, tpm.limit - tpm.current) / tpm.limit)
    )
  }

  isAvailable(status) {
    this.checkAndResetLimits(status)
    const { rpm, rpd, tpm } = status.limits
    return status.isActive && rpm.current < rpm.limit && rpd.current < rpd.limit && tpm.current < tpm.limit
  }

  async getBestAvailableKey() {
    const now = Date.now()
    if (this.cache !== null && this.cache.length > 0 && now - this.cacheTime < 5000) {
      const apiKey = this.cache[this.roundRobin % this.cache.length]
      this.roundRobin++
      const status = this.keys.get(apiKey)
      if (this.isAvailable(status)) {
        status.lastUsed = new Date()
        return {
          success: true,
          data: [apiKey, status],
          metadata: {
            availabilityScore: this.score(status),
            totalAvailable: this.cache.length,
            rotationMethod: 'cached-round-robin',
          },
        }
      }
    }
    const available = []
    for (const [apiKey, status] of this.keys) {
      if (this.isAvailable(status)) available.push({ apiKey, score: this.score(status) })
    }
    if (available.length === 0) return { success: false, error: 'No active API keys available', metadata: {} }
    available.sort((a, b) => b.score - a.score)
    this.cache = available.map((a) => a.apiKey)
    this.cacheTime = now
    this.roundRobin = 1
    const status = this.keys.get(this.cache[0])
    status.lastUsed = new Date()
    return {
      success: true,
      data: [this.cache[0], status],
      metadata: { availabilityScore: available[0].score, totalAvailable: available.length, rotationMethod: 'round-robin' },
    }
  }

  async recordUsage(apiKey, tokensUsed, success, error, responseTime) {
    const status = this.keys.get(apiKey)
    if (!status) return { success: false, error: 'API key not found', metadata: {} }
    this.checkAndResetLimits(status)
    if (success) {
      status.limits.rpm.current++
      status.limits.rpd.current++
      status.limits.tpm.current += tokensUsed
      status.errorCount = 0
      status.lastError = undefined
    } else {
      status.errorCount++
      status.lastError = error
      status.lastErrorTime = new Date()
      if (status.errorCount >= 5) {
        status.isActive = false
        this.cache = null
      }
    }
    return { success: true, metadata: {} }
  }
}

BaselineKeyManager.prototype.handleRateLimit = async function handleRateLimit(apiKey, limitType) {
  // The old service's (SPEC section 2): marks that window full, counts an error, drops the cache.
  const status = this.keys.get(apiKey)
  if (!status) return { success: false, error: 'API key not found', metadata: {} }
  const window = status.limits[WINDOW_OF[limitType]]
  if (!window) return { success: false, error: `Unknown limit type ${limitType}`, metadata: {} }
  this.checkAndResetLimits(status)
  window.current = window.limit
  status.errorCount++
  status.lastError = `Rate limit exceeded for ${limitType}`
  status.lastErrorTime = new Date()
  if (status.errorCount >= 5) status.isActive = false
  this.cache = null
  return { success: true, metadata: { limitType } }
}

BaselineKeyManager.prototype.getNextKeyForRotation = async function getNextKeyForRotation() {
  // The old service's (SPEC section 2): when the lowest-scored available key is under the
  // rotation threshold, another key above it; otherwise as getBestAvailableKey.
  const available = []
  for (const [apiKey, status] of this.keys) {
    if (this.isAvailable(status)) available.push({ apiKey, status, score: this.score(status) })
  }
  if (available.length === 0) return { success: false, error: 'No active API keys available', metadata: {} }
  const lowest = available.reduce((a, b) => (b.score < a.score ? b : a))
  const other = available.find((a) => a !== lowest && a.score > ROTATION_THRESHOLD)
  if (lowest.score >= ROTATION_THRESHOLD || other === undefined) return this.getBestAvailableKey()
  other.status.lastUsed = new Date()
  return {
    success: true,
    data: [other.apiKey, other.status],
    metadata: { availabilityScore: other.score, rotationReason: 'proactive-rotation', previousKeyScore: lowest.score },
  }
}

BaselineKeyManager.prototype.getAllKeysStatus = async function getAllKeysStatus() {
  const data = [...this.keys.values()]
  return { success: true, data, metadata: { totalKeys: data.length, activeKeys: data.filter((k) => k.isActive).length } }
}

module.exports = { BaselineKeyManager }
