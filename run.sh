#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv if needed, then supervised fine-tuning of the tiny NemotronH
# model on the shipped tasks (CPU, a few minutes) and its per-domain held-out scores. Run it again and it resumes
# from the latest checkpoint in out/sft. Extra arguments go to sft.py (see python sft.py --help).
# (Cascade RL and MOPD join this pipeline as rl.py and distill.py land.)
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/python sft.py "$@"
