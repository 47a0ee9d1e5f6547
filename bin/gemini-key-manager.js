#!/usr/bin/env node
'use strict'

// `gemini-key-manager serve [--port N] [--host ADDR] [--access-log] [--allow-insecure]`: the key
// manager as an HTTP service (SPEC section 4), and the Gemini proxy when proxy tokens are set. Keys,
// limits, the admin token (KEY_MANAGER_ADMIN_TOKEN) and the proxy tokens (KEY_MANAGER_PROXY_TOKENS)
// come from the environment, never from arguments, which `ps` would show.

const { ApiKeyManagerService } = require('../lib')

const USAGE = 'usage: gemini-key-manager serve [--port N] [--host ADDRESS] [--access-log] [--allow-insecure]'

function parseArgs(argv) {
  const [command, ...rest] = argv
  if (command !== 'serve') return { error: command ? `unknown command: ${command}` : 'no command given' }
  const options = {
    // Unset: localhost, both 127.0.0.1 and ::1, as `http://localhost:3001` may resolve to either.
    host: process.env.HOST || 'localhost',
    port: process.env.PORT ? Number(process.env.PORT) : 3001,
    accessLog: false,
  }
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i]
    if (arg === '--port') options.port = Number(rest[++i])
    else if (arg === '--host') options.host = rest[++i]
    else if (arg === '--access-log') options.accessLog = true
    // Listen beyond loopback without an admin token; otherwise KEY_MANAGER_ALLOW_INSECURE decides.
    else if (arg === '--allow-insecure') options.allowInsecure = true
    else return { error: `unknown option: ${arg}` }
  }
  if (!Number.isInteger(options.port) || options.port < 0 || options.port > 65535) {
    return { error: 'port must be an integer from 0 to 65535' }
  }
  if (!options.host) return { error: '--host needs an address' }
  return { options }
}

async function main() {
  const { error, options } = parseArgs(process.argv.slice(2))
  if (error) {
    console.error(`${error}\n${USAGE}`)
    return 2
  }
  const manager = new ApiKeyManagerService()
  const init = await manager.initialize()
  if (!init.success) {
    console.error(`❌ ${init.error}`)
    return 1
  }
  let server
  try {
    server = await manager.serve(options)
  } catch (e) {
    console.error(`❌ ${e.message}`)
    return 1
  }
  // The handlers go in before the line is printed: whoever waits for it may signal at once.
  const stopped = new Promise((resolve) => {
    process.once('SIGINT', resolve)
    process.once('SIGTERM', resolve)
  })
  console.log(`🚀 Gemini key manager listening on ${server.url}/api/keys`)
  if (server.proxy) console.log(`🔀 Gemini proxy for any SDK at ${server.url}/v1beta (and /v1, /v1beta/openai)`)
  await stopped
  console.log('🛑 Shutting down: finishing in-flight requests')
  await server.close()
  await manager.close()
  return 0
}

main().then(
  (code) => {
    process.exitCode = code
  },
  (e) => {
    console.error(`❌ ${e && e.message ? e.message : e}`)
    process.exitCode = 1
  },
)
