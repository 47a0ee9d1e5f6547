'use strict'

// `npm run lint`: ESLint's recommended rules over every JS file of the package, its tests, benches
// and scripts (all CommonJS on Node), but not the loader napi-rs generates (binding.js). .ci/run
// runs it.
const js = require('@eslint/js')
const globals = require('globals')

module.exports = [
  { ignores: ['binding.js', 'target/**', 'node_modules/**', 'dist/**', 'npm/**', 'bench/fixed-upstream/**', '.venv-*/**'] },
  js.configs.recommended,
  {
    files: ['**/*.js'],
    languageOptions: { ecmaVersion: 2023, sourceType: 'commonjs', globals: { ...globals.node } },
  },
]
