#!/usr/bin/env bash
# The whole Nemotron-Cascade 2 pipeline on the embedded default (tiny model, tiny shipped tasks; CPU, or the GPU
# when there is one):
#
#   SFT (sft.py) -> the RLHF judge (sft.py on data/judge_sft.jsonl) -> Cascade RL (rl.py: IF-RL -> multi-domain RL
#   -> RLHF -> long-context RL -> code RL -> agentic RL) -> MOPD (distill.py) -> scoreboard
#
# Sets up .venv if needed, then runs each stage into OUT (default out/): out/sft, out/judge, out/rl/<stage>,
# out/mopd, and at the end out/scoreboard.md, out/scoreboard.json and out/curves.png. Run it again with the same
# OUT and it skips finished stages and resumes an interrupted one from its latest checkpoint.
#
#   ./run.sh                                  # everything, seed 0, into out/
#   ./run.sh --seed 1 --out out/seed1         # another seed, another directory
#   ./run.sh --sft.lr=1e-3 --rl.eval_per_domain=50 --mopd.steps=60    # options for one stage
#   ./run.sh --help                           # this text; `python sft.py --help` (rl.py, distill.py) per stage
#
# Options: --out DIR and --seed N go to every stage; --sft.X=V, --judge.X=V, --rl.X=V and --mopd.X=V become --X=V
# of sft.py (the SFT, the judge's fine-tune), rl.py and distill.py. The RL preset's stage named "rlhf" is rewarded
# by OUT/judge/export. A changed stage option takes effect for a stage that has not finished yet: to redo a
# finished stage, delete its directory (out/sft, out/judge, out/rl/<stage>, out/mopd).
set -euo pipefail
cd "$(dirname "$0")"

out=out seed=0
sft_args=() judge_args=() rl_args=() mopd_args=() rl_set=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --out) out="$2"; shift ;;
        --out=*) out="${1#*=}" ;;
        --seed) seed="$2"; shift ;;
        --seed=*) seed="${1#*=}" ;;
        --sft.*) sft_args+=("--${1#--sft.}") ;;
        --judge.*) judge_args+=("--${1#--judge.}") ;;
        --rl.set=*) rl_set="${1#--rl.set=}" ;;
        --rl.*) rl_args+=("--${1#--rl.}") ;;
        --mopd.*) mopd_args+=("--${1#--mopd.}") ;;
        *) echo "run.sh: unknown argument '$1' (expected --out, --seed, --sft.X=V, --judge.X=V, --rl.X=V or --mopd.X=V; see --help)" >&2
           exit 2 ;;
    esac
    shift
done
case "$seed" in ''|*[!0-9]*) echo "run.sh: --seed must be a non-negative integer, got '$seed'" >&2; exit 2 ;; esac

./setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One torch thread per RL and MOPD process unless told otherwise: the sandbox and verifier workers need the other
# core (two threads on a busy 2-core machine made an RL step 15x slower); two for SFT. A run is reproducible for a
# given thread count (another count changes the last bits of every sum). Set OMP_NUM_THREADS to override both.
# Several runs side by side on 2 cores: let their SFTs run one at a time (three 2-thread SFTs at once crawled at
# 18 s a step instead of 0.55 s), or set OMP_NUM_THREADS=1 (different bits from the default run).
sft_threads="${OMP_NUM_THREADS:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
py=.venv/bin/python
stamp() { date +%s; }
t_start=$(stamp)

# 1. SFT from scratch on data/sft.jsonl. Its held-out score is taken by rl.py (the "sft" row of cascade.json),
#    with the same settings as every later row, so sft.py's own final evaluation is skipped here.
if [ -f "$out/sft/export/config.json" ]; then
    echo "run.sh: $out/sft/export exists: SFT is done, skipping it"
else
    # SFT runs alone (no sandbox or verifier workers beside it), so it takes two threads: 1.6 steps/s against 1.1
    OMP_NUM_THREADS="$sft_threads" $py sft.py --out_dir="$out/sft" --seed="$seed" --eval_data= \
        "${sft_args[@]+"${sft_args[@]}"}"
fi
t_sft=$(stamp)

# 2. The RLHF stage's generative reward model: the SFT model fine-tuned to rate chat answers (data/judge_sft.jsonl,
#    8,000 rows). Three epochs: after one it calls almost every answer on topic and in format (docs/results.md).
if [ -f "$out/judge/export/config.json" ]; then
    echo "run.sh: $out/judge/export exists: the judge is trained, skipping it"
else
    OMP_NUM_THREADS="$sft_threads" $py sft.py --model="$out/sft/export" --train_data=data/judge_sft.jsonl \
        --epochs=3 --lr=1e-3 --warmup_steps=10 --eval_data= --out_dir="$out/judge" --seed="$seed" \
        "${judge_args[@]+"${judge_args[@]}"}"
fi
#    Its agreement with the hidden criteria on data/judge.jsonl's 200 held-out pairs (about 10 s).
[ -f "$out/judge/agreement.json" ] || $py judge.py --judge="$out/judge/export" --out="$out/judge/agreement.json"
t_judge=$(stamp)

# 3. Cascade RL: the stages of configs/rl_tiny.json in order, each from the previous one's export; rl.py skips
#    finished stages and resumes an interrupted one; every checkpoint's held-out scores go to cascade.json.
#    The stage named "rlhf" is rewarded by the judge of step 2 (a --rl.set=... is applied after it).
$py rl.py --init="$out/sft/export" --out_dir="$out/rl" --seed="$seed" \
    --set="rlhf.reward_model=$out/judge/export${rl_set:+,$rl_set}" "${rl_args[@]+"${rl_args[@]}"}"
t_rl=$(stamp)

# 4. MOPD: the best checkpoint per domain (from cascade.json) teaches the last RL checkpoint; adds the "mopd" row.
$py distill.py --cascade="$out/rl/cascade.json" --out_dir="$out/mopd" --seed="$seed" \
    "${mopd_args[@]+"${mopd_args[@]}"}"
t_mopd=$(stamp)

# 5. The scoreboard: table, claims, curves.
$py scoreboard.py "$out"
echo "run.sh: wall time sft $((t_sft - t_start)) s, judge $((t_judge - t_sft)) s, rl $((t_rl - t_judge)) s," \
     "mopd $((t_mopd - t_rl)) s," \
     "total $(($(stamp) - t_start)) s"
