"""
SFT training throughput of the tiny default (tokens per second through forward + backward + optimizer step)
with 1 process vs 2 processes under torchrun (gloo on CPU, FSDP2), and the peak resident memory of a process
(rank 0's, as sft.py logs it).

Each configuration runs sft.py for --steps steps (no checkpoints, no final evaluation); throughput is the median
of the per-step tokens/s in its metrics.jsonl after the first --warmup steps. The runs alternate (1, 2, 1, 2 ...)
so load drift hits both alike. Threads: 1 process uses all --threads, 2 processes use --threads / 2 each, so
both use the same cores.

    python bench/bench_sft.py [--steps 12] [--rounds 2] [--threads 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(nproc, steps, threads, out_dir):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(max(1, threads // nproc)))
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    micro = 8 // nproc                                     # same global batch (8 rows of 512) either way
    cmd = launcher + [os.path.join(ROOT, "sft.py"), f"--out_dir={out_dir}", f"--max_steps={steps}",
                      "--save_every=0", "--eval_every=0", "--eval_data=", "--val_fraction=0",
                      f"--micro_batch={micro}", "--device=cpu"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f]
    return [r["tokens_per_s"] for r in rows], rows[-1]["peak_mem_mb"]      # rank 0's peak RSS


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs per configuration")
    ap.add_argument("--threads", type=int, default=2, help="cores to use in total")
    args = ap.parse_args()
    speeds, peaks = {1: [], 2: []}, {1: 0.0, 2: 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for nproc in (1, 2):
                tps, peak = run(nproc, args.steps, args.threads, os.path.join(tmp, f"{nproc}-{r}"))
                speeds[nproc] += tps[args.warmup:]
                peaks[nproc] = max(peaks[nproc], peak)
    print(f"SFT, tiny default (8 rows x 512 tokens per step), CPU, {args.threads} cores in total, "
          f"median over {args.rounds} runs x {args.steps - args.warmup} steps")
    for nproc in (1, 2):
        print(f"  {nproc} process{'es' if nproc > 1 else '  '}  {statistics.median(speeds[nproc]):8.0f} tokens/s   "
              f"peak RSS per process {peaks[nproc]:6.0f} MB")
    print(f"  2 processes / 1 process: {statistics.median(speeds[2]) / statistics.median(speeds[1]):.2f}x")
