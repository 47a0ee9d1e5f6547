#!/usr/bin/env bash
# Schemathesis against `npm start` with docs/openapi.json (the addon must be built: `npm run
# build`). Fails on any 5xx, on any answer the description does not allow (status, content type,
# body, headers, 401 and 405 behaviour), and on a full key in any answer (the `no_full_key` check
# of scripts/schemathesis_hooks.py). Every check runs, on a fixed seed and a bounded number of
# cases (scripts/schemathesis.toml), so a run is reproducible and takes seconds. Extra arguments go
# to `schemathesis run` (e.g. `--include-path /api/keys/best`, `--max-examples 10`).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
VENV=.venv-tools
TOKEN=schemathesis-admin-token

# The venv is shared with other tools: created when missing, schemathesis added when missing.
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# 39 characters, as Gemini's keys.
key() { printf 'AIzaSy%s%029d' "$1" "$2"; }
# The two TWIN keys share the masked form AIzaSyTW...0000, so the fuzzer, which only ever sees masked
# forms, can reach the 409 but can never disable or remove them: some key always serves `best`.
export GEMINI_API_KEYS="$(key TEST 1),$(key TEST 2),$(key TEST 3),$(key TWIN 10000),$(key TWIN 20000)"

log=$(mktemp)
# Its own process group, so that stopping it stops npm's child too.
KEY_MANAGER_ADMIN_TOKEN=$TOKEN HOST=127.0.0.1 PORT=0 setsid npm start >"$log" 2>&1 &
server=$!
stop() {
  kill -TERM -- "-$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -f "$log"
}
trap stop EXIT

url=
for _ in $(seq 100); do
  url=$(grep -o 'http://[0-9.:]*' "$log" | head -n 1 || true)
  [ -n "$url" ] && break
  if ! kill -0 "$server" 2>/dev/null; then
    cat "$log"
    echo "schemathesis.sh: the server did not start" >&2
    exit 1
  fi
  sleep 0.2
done
if [ -z "$url" ]; then
  cat "$log"
  echo "schemathesis.sh: the server did not say where it listens within 20 s" >&2
  exit 1
fi
echo "== schemathesis $SCHEMATHESIS_VERSION against $url"

# The Gemini proxy routes (tag gemini-proxy) are left out: they pass requests on to Gemini, which
# this run has none of, and are off here (no proxy token). __test__/proxy.test.js covers them.
# Hypothesis keeps its files in the venv rather than in the work tree.
SCHEMATHESIS_HOOKS=scripts/schemathesis_hooks.py HYPOTHESIS_STORAGE_DIRECTORY="$VENV/hypothesis" \
  "$VENV/bin/schemathesis" --no-color --config-file scripts/schemathesis.toml run docs/openapi.json \
  --url "$url" --header "Authorization: Bearer $TOKEN" --exclude-tag gemini-proxy "$@"
