#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv if needed, then builds the tiny NemotronH model and runs
# a forward pass. (Later stages turn this into the whole pipeline: SFT -> Cascade RL -> MOPD.)
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/python model.py configs/tiny_model.json "$@"
