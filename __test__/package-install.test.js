'use strict'

// Issue 10 point 2: the package installs and runs as users get it. `npm run pack:local` writes the
// tarballs of the main package and of this platform's binary package; both go into an empty app
// with npm offline, from an empty cache and with no Rust toolchain on PATH; the app then loads the
// package and serves it with `npx gemini-key-manager serve`.
//
// Both tarballs are installed in one `npm install`, as the registry would hand them out: the
// platform package at the app's top level satisfies the main package's optional dependency on it,
// and the other platforms' optional packages, which exist nowhere offline, are skipped by npm.
//
// PACK_LOCAL_OUTPUT names a directory that pack:local already filled, for Node versions too old
// to run @napi-rs/cli (CI packs once with a newer Node, then tests on each supported one).

const { test, before, after } = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { spawn, spawnSync } = require('node:child_process')
const { PKG, fakeKey, mask, cleanEnv } = require('./helpers')

const PKG_JSON = JSON.parse(fs.readFileSync(path.join(PKG, 'package.json'), 'utf8'))
const WINDOWS = process.platform === 'win32'
// The npm that ships with this node (run through node: npm.cmd on Windows needs a shell).
const NPM_BIN = WINDOWS
  ? path.join(path.dirname(process.execPath), 'node_modules', 'npm', 'bin')
  : path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'bin')
const NPM = path.join(NPM_BIN, 'npm-cli.js')
const NPX = path.join(NPM_BIN, 'npx-cli.js')
const PATH_KEY = Object.keys(process.env).find((k) => k.toUpperCase() === 'PATH') || 'PATH'
const KEYS = [fakeKey(101), fakeKey(102)]

let scratch // the temporary directory holding the app, npm's cache and config
let app
let env // the app's environment: no Rust on PATH, no npm settings from outside
let platformPackage // this platform's binary package's name
const running = new Set() // servers to stop if a test fails before stopping its own

/** PATH without any directory holding cargo or rustc, the running node's directory first. */
function rustFreePath() {
  const hasRust = (dir) => ['cargo', 'rustc', 'cargo.exe', 'rustc.exe'].some((f) => fs.existsSync(path.join(dir, f)))
  let nodeDir = path.dirname(process.execPath)
  if (hasRust(nodeDir)) {
    // Debian's packages put node, cargo and rustc all in /usr/bin: link node in on its own.
    nodeDir = path.join(scratch, 'node-bin')
    fs.mkdirSync(nodeDir)
    fs.symlinkSync(process.execPath, path.join(nodeDir, path.basename(process.execPath)))
  }
  const rest = (process.env[PATH_KEY] || '').split(path.delimiter).filter((d) => d && !hasRust(d))
  return [nodeDir, ...rest].join(path.delimiter)
}

/** The test's environment less every npm_* variable (`npm test` sets them, and they name this checkout). */
function withoutNpmVars(base) {
  return Object.fromEntries(Object.entries(base).filter(([k]) => !/^npm_/i.test(k) && k !== 'NAPI_RS_NATIVE_LIBRARY_PATH'))
}

function run(args, cwd, childEnv) {
  const r = spawnSync(process.execPath, args, { cwd, env: childEnv, encoding: 'utf8', timeout: 120000 })
  if (r.error) throw r.error
  assert.equal(r.status, 0, `${args.join(' ')} exited ${r.status}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`)
  return r
}

/** The tarballs of pack:local: { main, platform } paths, after running it unless CI already did. */
function tarballs() {
  let dir = process.env.PACK_LOCAL_OUTPUT
  if (!dir) {
    run([NPM, 'run', 'pack:local'], PKG, withoutNpmVars(cleanEnv()))
    dir = path.join(PKG, 'dist')
  }
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.tgz'))
  const main = `${PKG_JSON.name}-${PKG_JSON.version}.tgz`
  assert.ok(files.includes(main), `${main} is not among ${files.join(', ')} in ${dir}`)
  const others = files.filter((f) => f !== main)
  assert.equal(others.length, 1, `expected one platform tarball beside ${main} in ${dir}: ${others.join(', ')}`)
  platformPackage = others[0].slice(0, -`-${PKG_JSON.version}.tgz`.length)
  return { main: path.join(dir, main), platform: path.join(dir, others[0]) }
}

before(() => {
  assert.ok(fs.existsSync(NPM), `no npm beside this node at ${NPM}`)
  const { main, platform } = tarballs()
  scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'gkm-install-'))
  app = path.join(scratch, 'app')
  fs.mkdirSync(app)
  const npmrc = path.join(scratch, 'npmrc')
  fs.writeFileSync(npmrc, '')
  env = {
    ...withoutNpmVars(cleanEnv()),
    [PATH_KEY]: rustFreePath(),
    npm_config_userconfig: npmrc,
    npm_config_cache: path.join(scratch, 'npm-cache'),
    npm_config_update_notifier: 'false',
  }
  run([NPM, 'init', '-y'], app, env)
  run([NPM, 'install', main, platform, '--offline', '--no-audit', '--no-fund'], app, env)
})

after(() => {
  for (const child of running) stop(child)
  // Retries: on Windows a just-killed server may hold its files for a moment.
  if (scratch) fs.rmSync(scratch, { recursive: true, force: true, maxRetries: 5 })
})

test('the app has the main package and this platform binary package, and nothing else', () => {
  const installed = fs.readdirSync(path.join(app, 'node_modules')).filter((d) => !d.startsWith('.'))
  assert.deepEqual(installed.sort(), [PKG_JSON.name, platformPackage].sort())

  // Every platform package of napi.targets, at the main package's version, as `napi prepublish` writes them.
  const manifest = JSON.parse(fs.readFileSync(path.join(app, 'node_modules', PKG_JSON.name, 'package.json'), 'utf8'))
  const platformNames = fs.readdirSync(path.join(PKG, 'npm')).map((d) => require(path.join(PKG, 'npm', d, 'package.json')).name)
  assert.equal(Object.keys(manifest.optionalDependencies).length, PKG_JSON.napi.targets.length)
  assert.deepEqual(Object.keys(manifest.optionalDependencies).sort(), platformNames.sort())
  for (const v of Object.values(manifest.optionalDependencies)) assert.equal(v, PKG_JSON.version)
  assert.ok(platformNames.includes(platformPackage), platformPackage)
})

test('the main package ships its JavaScript, types, CLI and README, and no binary or build output', () => {
  const root = path.join(app, 'node_modules', PKG_JSON.name)
  const files = fs
    .readdirSync(root, { recursive: true })
    .filter((f) => fs.statSync(path.join(root, f)).isFile())
    .map((f) => f.split(path.sep).join('/'))
  for (const f of ['package.json', 'README.md', 'binding.js', 'binding.d.ts', 'index.d.ts', 'lib/index.js', 'bin/gemini-key-manager.js']) {
    assert.ok(files.includes(f), `${f} is missing from the installed package: ${files.join(', ')}`)
  }
  const stray = files.filter((f) => f.endsWith('.node') || /^(target|src|npm|__test__|node_modules)\//.test(f))
  assert.deepEqual(stray, [])
})

test("require('gemini-key-manager') loads the native binding from the platform package", () => {
  // Prints the API's type and the binary that was loaded (a .node file is cached like any module).
  const script = `const m = require('${PKG_JSON.name}')
    console.log(JSON.stringify([typeof m.getApiKeyManager, Object.keys(require.cache).filter((f) => f.endsWith('.node'))]))`
  const [kind, binaries] = JSON.parse(run(['-e', script], app, env).stdout)
  assert.equal(kind, 'function')
  assert.equal(binaries.length, 1, binaries.join(', '))
  assert.equal(path.dirname(binaries[0]), fs.realpathSync(path.join(app, 'node_modules', platformPackage)))
})

/** Starts `args` under node in the app with the fake keys; resolves once it prints its URL. */
function startServer(args) {
  // On POSIX the server gets a process group of its own, so that a signal reaches npx's shell and
  // the server too, as a terminal's Ctrl-C or a service manager's stop does.
  const child = spawn(process.execPath, args, {
    cwd: app,
    env: { ...env, GEMINI_API_KEYS: KEYS.join(',') },
    detached: !WINDOWS,
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  running.add(child)
  let output = ''
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })))
  exited.then(() => running.delete(child))
  const url = new Promise((resolve, reject) => {
    const onData = (d) => {
      output += d
      const m = output.match(/listening on (http:\/\/[^/\s]+)/)
      if (m) resolve(m[1])
    }
    child.stdout.setEncoding('utf8').on('data', onData)
    child.stderr.setEncoding('utf8').on('data', onData)
    exited.then(({ code, signal }) => reject(new Error(`exited (${code ?? signal}) before listening:\n${output}`)))
    setTimeout(() => reject(new Error(`not listening after 30 s:\n${output}`)), 30000).unref()
  })
  return { child, url, exited, output: () => output }
}

/** Ends a server's whole process tree: SIGTERM to its group on POSIX, taskkill on Windows. */
function stop(child) {
  if (WINDOWS) spawnSync('taskkill', ['/pid', String(child.pid), '/T', '/F'])
  else signalGroup(child.pid, 'SIGTERM')
}

/** Sends `signal` to process group `pgid`; false when no process of it is left. */
function signalGroup(pgid, signal) {
  try {
    process.kill(-pgid, signal)
    return true
  } catch (e) {
    if (e.code === 'ESRCH') return false
    throw e
  }
}

async function checkStatus(base) {
  const res = await fetch(`${base}/api/keys/status`)
  const text = await res.text()
  assert.equal(res.status, 200, text)
  for (const k of KEYS) assert.ok(!text.includes(k), `a full key is in the response: ${text}`)
  const json = JSON.parse(text)
  assert.equal(json.success, true, text)
  assert.deepEqual(json.data.map((s) => s.apiKey).sort(), KEYS.map(mask).sort())
  for (const s of json.data) assert.match(s.apiKey, /^.{8}\.\.\..{4}$/)
}

test('npx gemini-key-manager serve answers GET /api/keys/status with masked keys and stops on SIGTERM', { timeout: 60000 }, async () => {
  const server = startServer([NPX, '--offline', PKG_JSON.name, 'serve', '--port', '0'])
  await checkStatus(await server.url)
  stop(server.child)
  const { code, signal } = await server.exited
  if (WINDOWS) return // no signals there: taskkill ended it, which proves nothing about shutdown
  assert.match(server.output(), /🛑 Shutting down/)
  // npx itself ends by SIGTERM: its `sh -c` got the signal too, and npm re-raises the signal its
  // script died of. The server's own exit status is the next test's; here it must be gone too.
  assert.ok(code === 0 || signal === 'SIGTERM', `npx exited ${code ?? signal}:\n${server.output()}`)
  for (let i = 0; i < 100 && signalGroup(server.child.pid, 0); i++) await new Promise((r) => setTimeout(r, 100))
  assert.equal(signalGroup(server.child.pid, 0), false, 'the server outlived npx by 10 s')
})

test('the installed bin, sent SIGTERM the moment it says it listens, exits 0 after its shutdown line', { skip: WINDOWS && 'no SIGTERM on Windows', timeout: 60000 }, async () => {
  // The link npm made in node_modules/.bin, which npx runs through a shell. No request first: a
  // supervisor may stop the service as soon as it is up, and that must be a clean shutdown too.
  const server = startServer([path.join(app, 'node_modules', '.bin', PKG_JSON.name), 'serve', '--port', '0'])
  await server.url
  server.child.kill('SIGTERM')
  const { code, signal } = await server.exited
  assert.equal(code, 0, `exited ${code ?? signal}:\n${server.output()}`)
  assert.match(server.output(), /🛑 Shutting down/)
})
