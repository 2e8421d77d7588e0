#!/usr/bin/env bash
# Create .venv and install the project's dependencies into it, once per change of the requirement files.
# Used by run.sh (runtime deps) and test.sh (runtime + test deps); safe to run by hand.
#   ./setup.sh            runtime dependencies (requirements.txt)
#   ./setup.sh test       plus the test-only ones (requirements-test.txt: pytest, transformers)
set -euo pipefail
cd "$(dirname "$0")"
req=requirements.txt
[ "${1:-}" = "test" ] && req=requirements-test.txt
stamp=".venv/.installed-$(cat requirements*.txt | sha1sum | cut -c1-12)-$(basename "$req" .txt)"
if [ ! -f "$stamp" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    echo "setup: installing $req into .venv (first run only)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
    touch "$stamp"
fi
