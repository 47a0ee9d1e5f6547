'use strict'

// Code written against the old apiKeyManager.ts type-checks unchanged against index.d.ts:
// fixtures/old-caller.ts, compiled with `tsc --noEmit --strict` (fixtures/tsconfig.json), with
// the import '../..' resolving to this package's "types". And the package's types, index.d.ts and
// the generated binding.d.ts it imports, compile on their own with neither @types/node nor the DOM
// (fixtures/tsconfig.package-types.json), as an app's types may have neither.

const test = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')
const { spawnSync } = require('node:child_process')
const { PKG, FIXTURES, cleanEnv } = require('./helpers')

const TSC = path.join(PKG, 'node_modules', 'typescript', 'bin', 'tsc')
const TSCONFIG = path.join(FIXTURES, 'tsconfig.json')

function tsc(tsconfig, ...extra) {
  const r = spawnSync(process.execPath, [TSC, '-p', tsconfig, '--noEmit', '--strict', '--pretty', 'false', ...extra], {
    cwd: PKG,
    env: cleanEnv(),
    encoding: 'utf8',
    timeout: 300000,
  })
  if (r.error) throw r.error
  return r
}

test('old-caller.ts type-checks with tsc --noEmit --strict against index.d.ts', () => {
  const r = tsc(TSCONFIG, '--traceResolution')
  const trace = r.stdout.split('\n')
  const resolved = trace.find((l) => l.includes("Module name '../..' was successfully resolved"))
  assert.ok(resolved && resolved.includes(path.join(PKG, 'index.d.ts')), `'../..' did not resolve to index.d.ts: ${resolved}`)
  const errors = trace.filter((l) => /error TS\d+/.test(l))
  assert.equal(r.status, 0, `tsc failed:\n${errors.join('\n')}\n${r.stderr}`)
})

test('old-caller.ts also type-checks under node16 module resolution', () => {
  const r = tsc(TSCONFIG, '--module', 'node16', '--moduleResolution', 'node16')
  assert.equal(r.status, 0, `tsc failed:\n${r.stdout}\n${r.stderr}`)
})

test('index.d.ts and binding.d.ts compile without @types/node or the DOM', () => {
  const r = tsc(path.join(FIXTURES, 'tsconfig.package-types.json'), '--listFiles')
  assert.equal(r.status, 0, `tsc failed:\n${r.stdout}\n${r.stderr}`)
  // Beside TypeScript's own lib files, only the package's: no @types package was pulled in.
  const own = r.stdout.split('\n').filter((f) => f && !/[\\/]node_modules[\\/]typescript[\\/]lib[\\/]/.test(f))
  assert.deepEqual(own.map((f) => path.relative(PKG, f)).sort(), ['binding.d.ts', 'index.d.ts'])
})
