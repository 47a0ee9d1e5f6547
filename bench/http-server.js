'use strict'

// A server under test for bench/http.js, run in its own process so that it does not share an
// event loop (or a core's worth of JS) with the load generator:
//
//   node bench/http-server.js ours       the addon's Rust server (manager.serve)
//   node bench/http-server.js baseline   Express + the plain-JS BaselineKeyManager (bench/baseline.js)
//   node bench/http-server.js adapter    Express + this package's keyRoutes(manager)
//
// Prints `READY <port>` once listening on 127.0.0.1, and exits on SIGTERM or when stdin closes.

const { ApiKeyManagerService, keyRoutes } = require('../lib')
const { BaselineKeyManager } = require('./baseline')

const KEYS = Array.from({ length: 10 }, (_, i) => `AIzaSyBENCH${String(i).padStart(6, '0')}abcdefghijklmnopq`)
const HIGH = { rpm: 1e12, rpd: 1e12, tpm: 1e12 }

const mask = (key) => `${key.slice(0, 8)}...${key.slice(-4)}`

function listen(app) {
  return new Promise((resolve, reject) => {
    const server = app.listen(0, '127.0.0.1', () => resolve(server))
    server.once('error', reject)
  })
}

async function start(kind) {
  if (kind === 'ours') {
    const manager = new ApiKeyManagerService({ keys: KEYS, limits: HIGH, quiet: true })
    const server = await manager.serve({ host: '127.0.0.1', port: 0 })
    return { port: server.port, close: () => server.close().then(() => manager.close()) }
  }
  const express = require('express')
  const app = express()
  if (kind === 'baseline') {
    // What the old service's route did: ask the manager, answer the SPEC section 4 body, key masked.
    const manager = new BaselineKeyManager(KEYS, HIGH)
    app.get('/api/keys/best', async (req, res) => {
      try {
        const r = await manager.getBestAvailableKey()
        if (!r.success) {
          return res.status(500).json({ success: false, error: r.error, message: 'Failed to get best available API key' })
        }
        const [apiKey, status] = r.data
        res.json({
          success: true,
          data: {
            apiKey: mask(apiKey),
            availabilityScore: r.metadata.availabilityScore,
            totalAvailable: r.metadata.totalAvailable,
            rotationMethod: r.metadata.rotationMethod,
            lastUsed: status.lastUsed,
            limits: status.limits,
          },
          metadata: r.metadata,
          message: 'Best available API key retrieved successfully',
        })
      } catch (e) {
        res.status(500).json({ success: false, error: e.message, message: 'Failed to get best available API key' })
      }
    })
  } else if (kind === 'adapter') {
    const manager = new ApiKeyManagerService({ keys: KEYS, limits: HIGH, quiet: true })
    await manager.initialize()
    app.use('/api/keys', keyRoutes(manager))
  } else {
    throw new Error(`unknown server kind: ${kind} (ours, baseline or adapter)`)
  }
  const server = await listen(app)
  return {
    port: server.address().port,
    close: () =>
      new Promise((resolve) => {
        server.close(resolve)
        server.closeAllConnections()
      }),
  }
}

start(process.argv[2]).then(
  ({ port, close }) => {
    let closing = false
    const stop = () => {
      if (closing) return
      closing = true
      close().finally(() => process.exit(0))
    }
    process.once('SIGTERM', stop)
    process.once('SIGINT', stop)
    process.stdin.on('end', stop).on('error', stop).resume()
    console.log(`READY ${port}`)
  },
  (e) => {
    console.error(`❌ ${e && e.message ? e.message : e}`)
    process.exit(1)
  },
)
