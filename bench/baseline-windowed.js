'use strict'

// The plain-JS baseline of the old algorithm (bench/baseline.js) with its RPM and TPM windows
// shortened to `windowMs`, so that a run in simulated time (`npm run bench:gemini`) compresses the
// baseline's minute exactly as it does the manager's and the fake server's. The windows stay fixed
// ones that start with the manager and reset on the first touch after they end, as the old service's
// did. Also the old service's `handleRateLimit` (SPEC section 2: it marks that window full, counts
// an error and drops the cache), which bench/baseline.js does not have.

const { BaselineKeyManager } = require('./baseline')

const DAY = 86_400_000
const WINDOW_OF = { RPM: 'rpm', RPD: 'rpd', TPM: 'tpm' }

class WindowedBaselineKeyManager extends BaselineKeyManager {
  /**
   * @param {string[]} keys
   * @param {{ rpm: number, rpd: number, tpm: number }} [limits]
   * @param {{ windowMs?: number }} [options] span of the RPM and TPM windows (default a minute)
   */
  constructor(keys, limits, { windowMs = 60_000 } = {}) {
    super(keys, limits)
    this.windowMs = windowMs
    const now = Date.now()
    for (const status of this.keys.values()) {
      status.limits.rpm.resetTime = new Date(now + windowMs)
      status.limits.tpm.resetTime = new Date(now + windowMs)
    }
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

  async handleRateLimit(apiKey, limitType) {
    const status = this.keys.get(apiKey)
    if (!status) return { success: false, error: 'API key not found', metadata: {} }
    const window = status.limits[WINDOW_OF[limitType]]
    if (!window) return { success: false, error: `Unknown limit type ${limitType}`, metadata: {} }
    this.checkAndResetLimits(status)
    window.current = window.limit
    status.errorCount++
    status.lastError = `Rate limit exceeded for ${limitType}`
    status.lastErrorTime = new Date()
    this.cache = null
    return { success: true, metadata: { limitType } }
  }

  async getAllKeysStatus() {
    const data = [...this.keys.values()]
    return { success: true, data, metadata: { totalKeys: data.length, activeKeys: data.filter((k) => k.isActive).length } }
  }
}

module.exports = { WindowedBaselineKeyManager }
