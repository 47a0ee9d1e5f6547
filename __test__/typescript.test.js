'use strict'

// Code written against the old apiKeyManager.ts type-checks unchanged against index.d.ts:
// fixtures/old-caller.ts, compiled with `tsc --noEmit --strict` (fixtures/tsconfig.json), with
// the import '../..' resolving to this package's "types".

const test = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')
const { spawnSync } = require('node:child_process')
const { PKG, FIXTURES, cleanEnv } = require('./helpers')

const TSC = path.join(PKG, 'node_modules', 'typescript', 'bin', 'tsc')
const TSCONFIG = path.join(FIXTURES, 'tsconfig.json')

function tsc(...extra) {
  const r = spawnSync(process.execPath, [TSC, '-p', TSCONFIG, '--noEmit', '--strict', '--pretty', 'false', ...extra], {
    cwd: PKG,
    env: cleanEnv(),
    encoding: 'utf8',
    timeout: 300000,
  })
  if (r.error) throw r.error
  return r
}

test('old-caller.ts type-checks with tsc --noEmit --strict against index.d.ts', () => {
  const r = tsc('--traceResolution')
  const trace = r.stdout.split('\n')
  const resolved = trace.find((l) => l.includes("Module name '../..' was successfully resolved"))
  assert.ok(resolved && resolved.includes(path.join(PKG, 'index.d.ts')), `'../..' did not resolve to index.d.ts: ${resolved}`)
  const errors = trace.filter((l) => /error TS\d+/.test(l))
  assert.equal(r.status, 0, `tsc failed:\n${errors.join('\n')}\n${r.stderr}`)
})

test('old-caller.ts also type-checks under node16 module resolution', () => {
  const r = tsc('--module', 'node16', '--moduleResolution', 'node16')
  assert.equal(r.status, 0, `tsc failed:\n${r.stdout}\n${r.stderr}`)
})
