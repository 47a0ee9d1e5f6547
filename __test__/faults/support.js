'use strict'

// Shared by the fault suites (not a test file: node --test runs *.test.js only): nx-27017 servers
// started on free ports, hung (SIGSTOP) and resumed (SIGCONT); child processes whose output is read
// line by line as it comes, each line stamped with the time it arrived here; and the cleanup of
// every process a test started, run by `t.after` even when the test fails.

const assert = require('node:assert/strict')
const fs = require('node:fs')
const net = require('node:net')
const os = require('node:os')
const path = require('node:path')
const readline = require('node:readline')
const { spawn } = require('node:child_process')
const { MongoClient } = require('mongodb')
const { PKG, cleanEnv, fakeKey, freePort } = require('../helpers')

// The tests set what they need; none of this machine's settings (an admin token, a fingerprint
// secret, a spill directory) reaches them or their children.
for (const name of Object.keys(process.env)) if (name.startsWith('KEY_MANAGER_')) delete process.env[name]

const NX = path.join(PKG, '.venv-mongo', 'bin', 'nx-27017')
const FIXTURES = path.join(__dirname, 'fixtures')
const KEYS = [fakeKey(71), fakeKey(72), fakeKey(73)]

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Waits up to `ms` for `check()` to be true; returns whether it became true. */
async function eventually(check, ms, every = 50) {
  const deadline = Date.now() + ms
  while (Date.now() < deadline) {
    if (await check()) return true
    await sleep(every)
  }
  return check()
}

/** A directory of its own for one test, removed after it. */
function tempDir(t, name) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `gkm-faults-${name}-`))
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }))
  return dir
}

/**
 * A process started by a test, in a process group of its own (so cleanup reaches whatever it
 * started, as npm's children), its stdout and stderr kept as lines `{ at, stream, text }`.
 */
class Child {
  constructor(command, args, { env = {}, cwd = PKG } = {}) {
    this.lines = []
    this.exit = null
    // Its output is all read: 'exit' may come before the last lines.
    this.closed = false
    this._waiters = new Set()
    this.process = spawn(command, args, {
      cwd,
      env: cleanEnv(env),
      stdio: ['pipe', 'pipe', 'pipe'],
      detached: true,
    })
    this.pid = this.process.pid
    for (const stream of ['stdout', 'stderr']) {
      readline.createInterface({ input: this.process[stream] }).on('line', (text) => {
        this.lines.push({ at: Date.now(), stream, text })
        this._wake()
      })
    }
    this.exited = new Promise((resolve) => {
      this.process.once('exit', (code, signal) => {
        this.exit = { code, signal, at: Date.now() }
        this._wake()
        resolve(this.exit)
      })
    })
    this.process.once('close', () => {
      this.closed = true
      this._wake()
    })
    this.process.once('error', (e) => this.lines.push({ at: Date.now(), stream: 'error', text: String(e) }))
  }

  _wake() {
    for (const wake of this._waiters) wake()
  }

  /** The first line from index `from` on that matches `pattern`, waiting up to `ms` for it. */
  async waitFor(pattern, ms, from = 0) {
    const find = () => this.lines.slice(from).find((l) => pattern.test(l.text))
    const deadline = Date.now() + ms
    let found = find()
    while (found === undefined && !this.closed && Date.now() < deadline) {
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, deadline - Date.now())
        const wake = () => {
          clearTimeout(timer)
          this._waiters.delete(wake)
          resolve()
        }
        this._waiters.add(wake)
      })
      found = find()
    }
    assert.ok(found !== undefined, `no line matching ${pattern} within ${ms} ms (exit: ${JSON.stringify(this.exit)})\n${this.output()}`)
    return found
  }

  /** The JSON after `tag ` on the last line that starts with it, waiting up to `ms`. */
  async json(tag, ms, from = 0) {
    const line = await this.waitFor(new RegExp(`^${tag} `), ms, from)
    return JSON.parse(line.text.slice(tag.length + 1))
  }

  send(text) {
    this.process.stdin.write(`${text}\n`)
  }

  signal(name) {
    if (this.exit === null) process.kill(this.pid, name)
  }

  /** Resolves to the exit, or fails the test after `ms`. */
  async waitExit(ms) {
    let timer
    const late = new Promise((resolve) => (timer = setTimeout(resolve, ms, null)))
    const exit = await Promise.race([this.exited, late])
    clearTimeout(timer)
    assert.ok(exit !== null, `pid ${this.pid} did not exit within ${ms} ms\n${this.output()}`)
    return exit
  }

  /** Kills the whole group, whatever state it is in (a stopped process dies of SIGKILL too). */
  kill() {
    try {
      process.kill(-this.pid, 'SIGKILL')
    } catch {
      // Already gone.
    }
  }

  output() {
    return this.lines.map((l) => `[${l.stream}] ${l.text}`).join('\n')
  }
}

/** Starts a child process that `t.after` kills, with its process group. */
function start(t, command, args, options) {
  const child = new Child(command, args, options)
  t.after(() => child.kill())
  return child
}

/** Runs a fixture of this directory in a node process that `t.after` kills. */
function startFixture(t, file, plan, env) {
  return start(t, process.execPath, [path.join(FIXTURES, file), JSON.stringify(plan)], { env })
}

function canConnect(port) {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' })
    socket.setTimeout(300)
    socket.once('connect', () => {
      socket.destroy()
      resolve(true)
    })
    socket.once('error', () => resolve(false))
    socket.once('timeout', () => {
      socket.destroy()
      resolve(false)
    })
  })
}

/**
 * Starts nx-27017 on `port` (a free one unless given) over `db` ('memory' or a file, which outlives
 * the process) and waits until it accepts connections. `t.after` kills it.
 */
async function startNx(t, { port, db = 'memory', dir } = {}) {
  assert.ok(fs.existsSync(NX), `${NX} is missing: run \`bash scripts/mongo-test-server.sh\``)
  port ??= await freePort()
  dir ??= tempDir(t, 'nx')
  const base = path.join(dir, `nx-${port}-${Date.now()}`)
  // A pid file of its own: with the default one, a second server refuses to start.
  const args = ['--db', db, '--host', '127.0.0.1', '-p', String(port), '--log-file', `${base}.log`, '--pid-file', `${base}.pid`]
  const child = start(t, NX, args)
  const up = await eventually(async () => child.exit === null && (await canConnect(port)), 20000)
  assert.ok(up, `nx-27017 did not start on port ${port}: ${child.output()}`)
  return {
    port,
    uri: `mongodb://127.0.0.1:${port}/?directConnection=true`,
    hang: () => process.kill(child.pid, 'SIGSTOP'),
    resume: () => process.kill(child.pid, 'SIGCONT'),
    /** kill -9, and waits until it is gone. */
    async kill9() {
      child.kill()
      await child.waitExit(10000)
    },
  }
}

/** The database's collections through the Node driver; the client is closed by `t.after`. */
async function inspect(t, uri, dbName) {
  const client = new MongoClient(uri, { serverSelectionTimeoutMS: 10000 })
  await client.connect()
  t.after(() => client.close().catch(() => {}))
  const db = client.db(dbName)
  return { db, keys: db.collection('api_keys'), usage: db.collection('api_key_usage'), admissions: db.collection('api_key_admissions') }
}

/**
 * What the usage collection holds of calls numbered by their token counts (the recorder's calls):
 * documents, distinct ids, the distinct numbers and whether they are exactly 1..n.
 */
async function storedCalls(usage) {
  const docs = await usage.find({}, { projection: { _id: 1, tokensUsed: 1 } }).toArray()
  const ids = new Set(docs.map((d) => String(d._id)))
  const numbers = [...new Set(docs.map((d) => d.tokensUsed))].sort((a, b) => a - b)
  const prefix = numbers.every((n, i) => n === i + 1)
  return { docs: docs.length, ids: ids.size, numbers, prefix }
}

/** A process's resident memory in bytes, from /proc. */
function rss(pid) {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8')
  const kb = Number(/^VmRSS:\s+(\d+) kB/m.exec(status)[1])
  return kb * 1024
}

/** Whether `pid` is a live process (a zombie counts as gone). */
function alive(pid) {
  try {
    return !/^State:\s+Z/m.test(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))
  } catch {
    return false
  }
}

/** The pids whose parent is `pid`, from /proc. */
function childrenOf(pid) {
  const out = []
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      // The command name in parentheses may hold spaces: the fields after it are fixed.
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8')
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1])
      if (ppid === pid) out.push(Number(entry))
    } catch {
      // Gone meanwhile.
    }
  }
  return out
}

const MB = (bytes) => `${(bytes / 2 ** 20).toFixed(1)} MB`

module.exports = {
  FIXTURES,
  KEYS,
  MB,
  alive,
  childrenOf,
  eventually,
  inspect,
  rss,
  sleep,
  start,
  startFixture,
  startNx,
  storedCalls,
  tempDir,
}
