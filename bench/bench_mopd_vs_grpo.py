"""
The paper's head-to-head at tiny scale: from the same checkpoint, the same number of steps of MOPD (distill.py,
teachers from cascade.json) and of multi-domain GRPO on all domains (rl.py, one stage over every domain), then
per-domain held-out pass@1 and wall time of each, side by side. The paper finds MOPD reaches the teachers faster
(AIME25: the teacher's 92.0 within 30 steps, where GRPO went 89.9 -> 91.0 in 25).

    python bench/bench_mopd_vs_grpo.py --cascade out/rl/cascade.json --steps 20 --out out/h2h

Both arms use the same prompts file, prompts per step and evaluation settings (those cascade.json records); each arm's rollouts per prompt
are its own stage's default (MOPD 4, GRPO 8), as the paper runs them. Not part of ./run.sh.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, log_path):
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"bench: {' '.join(cmd)} failed (exit {proc.returncode}); see {log_path}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cascade", default="out/rl/cascade.json", help="a finished cascade (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each arm (default: %(default)s)")
    ap.add_argument("--prompts_per_step", type=int, default=8, help="prompts per step, both arms (default: %(default)s)")
    ap.add_argument("--grpo_lr", type=float, default=1e-4, help="GRPO learning rate (default: %(default)s)")
    ap.add_argument("--out", default="out/h2h", help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of both arms (default: %(default)s)")
    args = ap.parse_args()
    if not os.path.exists(args.cascade):
        sys.exit(f"bench: --cascade {args.cascade}: no such file (run ./run.sh first)")
    with open(args.cascade) as f:
        cascade = json.load(f)
    start = next(r for r in reversed(cascade["rows"]) if r["name"] != "mopd")   # the last RL checkpoint
    domains = cascade["domains"]
    os.makedirs(args.out, exist_ok=True)
    py = sys.executable
    ev = cascade.get("evaluation", {})     # both arms score with the settings every cascade row was scored with
    evaluation = [f"--eval_data={ev.get('data', 'data/eval.jsonl')}", f"--eval_per_domain={ev.get('per_domain', 0)}",
                  f"--eval_max_new_tokens={ev.get('max_new_tokens', 80)}"]

    # arm 1: MOPD, teachers from the cascade, student = its last RL checkpoint
    mopd_cascade = os.path.join(args.out, "mopd_cascade.json")
    with open(mopd_cascade, "w") as f:          # a copy without any earlier mopd row: distill.py appends its own
        json.dump(dict(cascade, rows=[r for r in cascade["rows"] if r["name"] != "mopd"]), f)
    t_mopd = run([py, "distill.py", f"--cascade={mopd_cascade}", f"--out_dir={os.path.join(args.out, 'mopd')}",
                  f"--student={start['checkpoint']}", f"--steps={args.steps}",
                  f"--prompts_per_step={args.prompts_per_step}", f"--seed={args.seed}"], os.path.join(args.out, "mopd.log"))

    # arm 2: one GRPO stage on every domain, from the same checkpoint
    preset = os.path.join(args.out, "grpo_all.json")
    with open(preset, "w") as f:
        json.dump({"stages": [{"name": "grpo-all", "domains": domains, "steps": args.steps,
                               "prompts_per_step": args.prompts_per_step, "lr": args.grpo_lr}]}, f)
    t_grpo = run([py, "rl.py", f"--config={preset}", f"--init={start['checkpoint']}", f"--init_name={start['name']}",
                  f"--out_dir={os.path.join(args.out, 'grpo')}", f"--seed={args.seed}", *evaluation],
                 os.path.join(args.out, "grpo.log"))

    with open(mopd_cascade) as f:
        mopd = next(r for r in json.load(f)["rows"] if r["name"] == "mopd")
    with open(os.path.join(args.out, "grpo", "cascade.json")) as f:
        grpo_rows = json.load(f)["rows"]
    grpo = next(r for r in grpo_rows if r["name"] == "grpo-all")
    best = {dom: max(r["scores"].get(dom, 0.0) for r in cascade["rows"] if r["name"] != "mopd") for dom in domains}
    print(f"from {start['name']} ({start['checkpoint']}), {args.steps} steps each; held-out greedy pass@1:")
    print(f"| arm | wall s | " + " | ".join(domains) + " | mean |")
    print("| --- | ---: | " + " | ".join("---:" for _ in domains) + " | ---: |")
    for name, row, secs in (("start", start, 0.0), ("best teacher", {"scores": best}, 0.0),
                            ("MOPD", mopd, t_mopd), ("GRPO (all domains)", grpo, t_grpo)):
        s = [row["scores"].get(dom, float("nan")) for dom in domains]
        print(f"| {name} | {secs:.0f} | " + " | ".join(f"{v:.3f}" for v in s) + f" | {sum(s) / len(s):.3f} |")


if __name__ == "__main__":
    main()
