#!/usr/bin/env bash
# Sets up .venv with the test dependencies if needed, then runs the test suite (CPU only). Extra arguments go
# to pytest, e.g. ./test.sh tests/test_model.py -k transformers
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh test
exec .venv/bin/python -m pytest "$@"
