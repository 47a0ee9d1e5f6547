#!/usr/bin/env bash
# Installs nx-27017 (a MongoDB wire-protocol server over SQLite, see shared/MONGO.md) into
# .venv-mongo, which the store tests and the Node tests start on free ports. There is no mongod on
# these machines, so this is the project's test database. Idempotent: does nothing when present.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="0.8.1"
VENV=".venv-mongo"
BIN="$VENV/bin/nx-27017"

# The version is read into a variable first: `pip show | grep -q` under pipefail fails on SIGPIPE.
installed="$([ -x "$VENV/bin/pip" ] && "$VENV/bin/pip" show nx-27017 2>/dev/null || true)"
if [ -x "$BIN" ] && grep -qx "Version: $VERSION" <<<"$installed"; then
  echo "nx-27017 $VERSION already installed in $VENV"
  exit 0
fi

python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "nx-27017==$VERSION"
echo "nx-27017 $VERSION installed: $BIN"
