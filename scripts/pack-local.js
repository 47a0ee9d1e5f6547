'use strict'

// `npm run pack:local`: writes to dist/ the npm tarballs a user on this machine's platform would
// install: the main package, with every platform package of napi.targets in optionalDependencies
// at its own version (as `napi prepublish` writes them), and this platform's binary package with
// the .node that `npm run build` left in the checkout. It does not build: without that .node it
// stops and says so. Everything is packed from staged copies, so the checkout is left as it was.
//
// `napi prepublish` and `napi artifacts` are not run: both refuse to work without a built binary
// for every target. The CLI's own config reader names the platform packages instead, so the names
// are the ones a release publishes. Needs the Node that @napi-rs/cli needs (20.17 or later).

const fs = require('node:fs')
const path = require('node:path')
const { execFileSync } = require('node:child_process')
const { readNapiConfig } = require('@napi-rs/cli')

const ROOT = path.resolve(__dirname, '..')
const DIST = path.join(ROOT, 'dist')
const STAGE = path.join(DIST, 'stage')

/** Runs the npm that runs this script (so no shell is needed for npm.cmd on Windows). */
function npm(args, cwd) {
  const cli = process.env.npm_execpath
  if (!cli) throw new Error('run this as `npm run pack:local`')
  return execFileSync(process.execPath, [cli, ...args], { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
}

/** The napi target this Node runs on: platform, CPU and, on Linux, the C library. */
function hostTarget(targets) {
  let abi = null
  if (process.platform === 'linux') abi = process.report.getReport().header.glibcVersionRuntime ? 'gnu' : 'musl'
  if (process.platform === 'win32') abi = 'msvc'
  const target = targets.find((t) => t.platform === process.platform && t.arch === process.arch && t.abi === abi)
  if (!target) throw new Error(`${process.platform}-${process.arch} (${abi || 'no abi'}) is not one of napi.targets`)
  return target
}

function writeJson(file, value) {
  fs.writeFileSync(file, `${JSON.stringify(value, null, 2)}\n`)
}

/** `npm pack` of a staged directory into dist/; returns the tarball's path. */
function pack(dir) {
  // Lifecycle scripts are skipped: a staged copy has no devDependencies to run them with.
  const [{ filename }] = JSON.parse(npm(['pack', '--json', '--ignore-scripts', '--pack-destination', DIST], dir))
  return path.join(DIST, filename)
}

async function main() {
  const pkgJsonPath = path.join(ROOT, 'package.json')
  const pkg = JSON.parse(fs.readFileSync(pkgJsonPath, 'utf8'))
  const { targets, binaryName, packageName } = await readNapiConfig(pkgJsonPath)
  const host = hostTarget(targets)
  const binary = `${binaryName}.${host.platformArchABI}.node`
  if (!fs.existsSync(path.join(ROOT, binary))) throw new Error(`${binary} is missing: run \`npm run build\` first`)

  fs.rmSync(DIST, { recursive: true, force: true })
  const mainStage = path.join(STAGE, 'main')
  const platformStage = path.join(STAGE, host.platformArchABI)
  try {
    // The main package: exactly the files npm would pack from the checkout, then the manifest with
    // the platform packages added.
    const [{ files }] = JSON.parse(npm(['pack', '--dry-run', '--json'], ROOT))
    for (const { path: file } of files) fs.cpSync(path.join(ROOT, file), path.join(mainStage, file))
    const optionalDependencies = { ...pkg.optionalDependencies }
    for (const t of targets) optionalDependencies[`${packageName}-${t.platformArchABI}`] = pkg.version
    writeJson(path.join(mainStage, 'package.json'), { ...pkg, optionalDependencies })

    // This platform's package: its npm/ directory, the binary, and the main package's version.
    const platformDir = path.join(ROOT, 'npm', host.platformArchABI)
    fs.cpSync(platformDir, platformStage, { recursive: true })
    fs.copyFileSync(path.join(ROOT, binary), path.join(platformStage, binary))
    const platformPkg = JSON.parse(fs.readFileSync(path.join(platformDir, 'package.json'), 'utf8'))
    if (platformPkg.name !== `${packageName}-${host.platformArchABI}`) {
      throw new Error(`npm/${host.platformArchABI}/package.json names ${platformPkg.name}`)
    }
    writeJson(path.join(platformStage, 'package.json'), { ...platformPkg, version: pkg.version })

    for (const tarball of [pack(mainStage), pack(platformStage)]) console.log(path.relative(ROOT, tarball))
  } finally {
    fs.rmSync(STAGE, { recursive: true, force: true })
  }
}

main().catch((e) => {
  console.error(`pack:local: ${e.message}`)
  process.exitCode = 1
})
