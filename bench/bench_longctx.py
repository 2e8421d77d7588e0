"""
Rollouts of long prompts: prefill tokens/s and peak memory at 1x, 4x and 16x the tiny domains' prompt length.

The tiny model (configs/tiny_model.json, random weights) samples the RL shape, --prompts prompts x --rollouts
completions of --new-tokens tokens at temperature 1, for prompts of 1x, 4x and 16x the median prompt of the
shipped single-turn domains other than longctx (data/eval.jsonl, chat template, thinking mode). Each run is a
fresh process (the peak is the process's high-water mark: ru_maxrss on CPU, max_memory_allocated on CUDA),
which measures
  prefill tokens/s   the prompts' tokens over the time of generate(max_new_tokens=1): the length-bucketed
                     prefill (pieces of --prefill-chunk after the first) and one sampled token
  rollout peak       the memory a whole rollout (prefill, cache copied per completion, decode) adds to the
                     process after the model is built and warmed up
and the table shows the median over --repeats runs, with each length's ratio to 1x beside the length's own
ratio. Linear growth is a tokens/s ratio of 1 (a prefill costs the same per token however long) and a peak that
grows by the same bytes per prompt token from one length to the next (the KV cache and the prefill's activations
grow with the prompt): the last column. The peak also has a part that does not grow (the Mamba state, the
decode's logits and sampling), so its ratio to 1x stays under the length's.

    python bench/bench_longctx.py [--repeats 3] [--threads 1] [--device cpu]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def base_length():
    """The median prompt length, in tokens, of the shipped single-turn domains other than longctx."""
    import tasks
    from tokenizer import encode_prompt, load_tokenizer
    tok = load_tokenizer(os.path.join(ROOT, "data", "tokenizer.json"))
    with open(os.path.join(ROOT, "data", "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    lengths = sorted(len(encode_prompt(tok, r["messages"], tools=r.get("tools"))) for r in rows
                     if r["domain"] not in tasks.ENVIRONMENTS and r["domain"] != "longctx")
    return lengths[len(lengths) // 2]


def one_run(args, length):
    """One process: build and warm up the model, then time the prefill and measure a rollout's peak."""
    import torch
    from model import Model, ModelConfig
    from sample import generate
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Model(ModelConfig.from_json(os.path.join(ROOT, "configs", "tiny_model.json"))).to(device).eval()
    g = torch.Generator().manual_seed(length)
    prompts = [torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(args.prompts)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generate(model, [p[:16] for p in prompts[:2]], 2, seed=0)            # warm-up: kernels, allocator, lazy imports

    def peak():
        return torch.cuda.max_memory_allocated() if device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sync()
    before = peak()                        # the rollout first: the high-water mark is still the warm-up's
    generate(model, prompts, args.new_tokens, n=args.rollouts, seed=0, prefill_chunk=args.prefill_chunk)
    sync()
    added = peak() - before
    t0 = time.perf_counter()
    generate(model, prompts, 1, seed=0, prefill_chunk=args.prefill_chunk)
    sync()
    return dict(length=length, prefill_tokens_per_s=length * args.prompts / (time.perf_counter() - t0),
                rollout_peak_mb=added / 2**20)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per length (the median is shown)")
    ap.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 16], help="prompt lengths, x the base")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout batch")
    ap.add_argument("--rollouts", type=int, default=8, help="completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens per completion")
    ap.add_argument("--prefill-chunk", type=int, default=4096, help="generate's prefill_chunk")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)   # a child process: one run at this length
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(args, args.one)))
        return
    base = base_length()
    print(f"tiny model, {args.prompts} prompts x {args.rollouts} rollouts x {args.new_tokens} new tokens, "
          f"{args.threads} thread(s) on {args.device}; base length {base} tokens (median prompt of the shipped "
          f"single-turn domains but longctx); median of {args.repeats} runs, each in a fresh process")
    child = [sys.executable, os.path.abspath(__file__)] + [a for a in sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results = {}
    for _ in range(args.repeats):               # lengths interleaved, so load drift hits every length alike
        for m in args.multiples:
            out = subprocess.run(child + ["--one", str(m * base)], capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            results.setdefault(m, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("prefill_tokens_per_s", "rollout_peak_mb")}
           for m, rs in results.items()}
    first = args.multiples[0]
    print(f"| prompt | tokens | prefill tokens/s | vs {first}x | rollout peak MB | vs {first}x | length vs {first}x "
          f"| MB per 1K more tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, m in enumerate(args.multiples):
        tps, mb = med[m]["prefill_tokens_per_s"], med[m]["rollout_peak_mb"]
        prev = args.multiples[i - 1] if i else None
        slope = f"{(mb - med[prev]['rollout_peak_mb']) / ((m - prev) * base) * 1000:,.0f}" if i else "-"
        print(f"| {m}x | {m * base} | {tps:,.0f} | {tps / med[first]['prefill_tokens_per_s']:.2f} | {mb:,.1f} | "
              f"{mb / med[first]['rollout_peak_mb']:.2f} | {m / first:.0f} | {slope} |")


if __name__ == "__main__":
    main()
