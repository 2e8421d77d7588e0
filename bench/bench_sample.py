"""
Benchmark the sampler against transformers' NemotronHForCausalLM.generate on the same weights (CPU by default).

1. Decode throughput: generated tokens per second of one greedy generate call (prefill included) for 16 and 64
   ragged prompts (32-128 tokens) x 64 new tokens, no stop token, both with their caches. Runs are interleaved
   (ours, theirs, theirs, ours, ...) so load drift hits both alike; the ratio is the median of per-round ratios
   (> 1 means we are faster). Also the share of rows whose greedy tokens agree exactly (a sanity check: random
   weights have near-ties, so a few rows may part late).
2. Time to first token for one 2K-token prompt (generate with max_new_tokens=1: the prefill plus one sample).

The model is the small one of bench_model.py (hidden 256, 10 layers of all kinds, 32 experts, top-4), random.

    python bench/bench_sample.py [--repeats 3] [--batches 16 64] [--threads 2] [--device cpu]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_model import SMALL  # noqa: E402
from model import Model, ModelConfig  # noqa: E402
from sample import generate  # noqa: E402


def load_both(device):
    import transformers
    from transformers import NemotronHForCausalLM
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    ours = Model(ModelConfig(**SMALL)).to(device).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = NemotronHForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
    return ours, theirs


def left_pad(prompts, device):
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    return ids.to(device), mask.to(device)


def timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def run_ours(model, prompts, new_tokens):
    return [c.tokens for c in generate(model, prompts, new_tokens, temperature=0, stop_token_ids=[])]


@torch.inference_mode()
def run_theirs(model, ids, mask, new_tokens):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
    return out[:, ids.shape[1]:].tolist()


def interleaved(f_ours, f_theirs, repeats, sync):
    t_ours, t_theirs, outs = [], [], None
    for r in range(repeats):
        pair = [("ours", f_ours), ("theirs", f_theirs)]
        for name, f in pair if r % 2 == 0 else pair[::-1]:
            t, out = timed(f, sync)
            (t_ours if name == "ours" else t_theirs).append(t)
            outs = outs or {}
            outs[name] = out
    ratios = [b / a for a, b in zip(t_ours, t_theirs)]
    return t_ours, t_theirs, statistics.median(ratios), outs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per measurement")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="prompts per generate call")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--ttft-len", type=int, default=2048, help="prompt length for time to first token (0 = skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ours, theirs = load_both(device)
    V, g = SMALL["vocab_size"], torch.Generator().manual_seed(0)
    print(f"small model: {SMALL['hybrid_override_pattern']}, hidden {SMALL['hidden_size']}, "
          f"{SMALL['n_routed_experts']} experts top-{SMALL['num_experts_per_tok']}, vocab {V}; device {device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds")

    warm = [torch.randint(3, V, (20,), generator=g).tolist()] * 2                 # warm-up, untimed
    run_ours(ours, warm, 4), run_theirs(theirs, *left_pad(warm, device), 4)

    print(f"\n1. decode throughput, greedy, {args.new_tokens} new tokens per prompt, prompts of 32-128 tokens")
    print(f"{'prompts':>8} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'rows agree':>11}")
    for B in args.batches:
        lens = torch.randint(32, 129, (B,), generator=g).tolist()
        prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in lens]
        ids, mask = left_pad(prompts, device)
        t_o, t_t, ratio, outs = interleaved(lambda: run_ours(ours, prompts, args.new_tokens),
                                            lambda: run_theirs(theirs, ids, mask, args.new_tokens),
                                            args.repeats, sync)
        n_tok = B * args.new_tokens
        agree = sum(a == b for a, b in zip(outs["ours"], outs["theirs"])) / B
        print(f"{B:>8} {n_tok / statistics.median(t_o):>11,.0f} {n_tok / statistics.median(t_t):>9,.0f} "
              f"{ratio:>5.2f}x {agree:>10.0%}", flush=True)

    if args.ttft_len:
        prompt = [torch.randint(3, V, (args.ttft_len,), generator=g).tolist()]
        ids, mask = left_pad(prompt, device)
        t_o, t_t, ratio, _ = interleaved(lambda: run_ours(ours, prompt, 1), lambda: run_theirs(theirs, ids, mask, 1),
                                         args.repeats, sync)
        print(f"\n2. time to first token, one {args.ttft_len}-token prompt: ours {statistics.median(t_o) * 1e3:,.0f} ms,"
              f" hf {statistics.median(t_t) * 1e3:,.0f} ms ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
