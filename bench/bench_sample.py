"""
Benchmark the sampler against transformers' NemotronHForCausalLM.generate on the same weights (CPU by default).

1. Greedy throughput: generated tokens per second of one generate call (prefill included) for 16 and 64 ragged
   prompts (32-128 tokens) x 64 new tokens, no stop token, both with their caches; and where the time goes: the
   prefill (a call for one new token) and the mean decode step (the rest of the full call, per token).
2. Group sampling, the RL shape: 8 prompts x 8 completions x 128 tokens at temperature 1 (ours prefills each
   prompt once and copies its cache row; transformers' num_return_sequences prefills every copy).
   Runs are interleaved (ours, theirs, theirs, ours, ...) so load drift hits both alike; each ratio is the median
   of per-round ratios (> 1 means we are faster), in wall time and in process CPU time (the fairer clock on a
   shared machine: with --threads 1 it is the work done, whoever else runs). Also the share of rows whose greedy
   tokens agree exactly (random weights have near-ties, so a few rows may part late).
3. Ops and host syncs per decode step (torch profiler; the difference between a long and a short call, over the
   extra steps): the reference loop (generate(reference=True)) and the fixed-slot loop. "issued" counts the aten
   ops called from Python, "all" includes those the ops call inside (on CPU, torch._grouped_mm loops over the
   experts and reads each offset with .item(), so MoE layers add syncs that a GPU kernel does not have);
   syncs = item / bool / nonzero. Measured on a model with MoE layers and on the same without them.
4. Time to first token for one 2K-token prompt (generate with max_new_tokens=1: the prefill plus one sample).
5. On CUDA only: decode tokens/s at batch 1, 16, 128 of the small model and of a Nano-shaped slice (hidden 2688,
   128 experts top-6, vocab 131072; --nano-layers layers), eager vs CUDA graphs, against the HBM bound
   (bytes one decode step must read: active weights + caches, at --hbm-gbps).

The model is the small one of bench_model.py (hidden 256, 10 layers of all kinds, 32 experts, top-4), random.

    python bench/bench_sample.py [--repeats 3] [--batches 16 64] [--threads 1] [--device cpu]
"""
import argparse
import collections
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
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return (time.perf_counter() - t0, time.process_time() - c0), out


def run_ours(model, prompts, new_tokens, **kw):
    kw = dict(dict(temperature=0), **kw)
    return [c.tokens for c in generate(model, prompts, new_tokens, stop_token_ids=[], **kw)]


@torch.inference_mode()
def run_theirs(model, ids, mask, new_tokens, n=1, sample=False):
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n) if sample else \
        dict(do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         eos_token_id=None, pad_token_id=0, use_cache=True, **kw)
    return out[:, ids.shape[1]:].tolist()


def interleaved(f_ours, f_theirs, repeats, sync):
    """(ours wall s, theirs wall s, wall ratio, cpu ratio, last outputs) over interleaved rounds (medians)."""
    t_ours, t_theirs, outs = [], [], {}
    for r in range(repeats):
        pair = [("ours", f_ours), ("theirs", f_theirs)]
        for name, f in pair if r % 2 == 0 else pair[::-1]:
            t, outs[name] = timed(f, sync)
            (t_ours if name == "ours" else t_theirs).append(t)
    wall = statistics.median(b[0] / a[0] for a, b in zip(t_ours, t_theirs))
    cpu = statistics.median(b[1] / a[1] for a, b in zip(t_ours, t_theirs))
    return (statistics.median(t[0] for t in t_ours), statistics.median(t[0] for t in t_theirs), wall, cpu, outs)


def step_profile(model, prompts, short=8, long=24, **kw):
    """(issued ops, all ops, host syncs) per decode step of generate(**kw)."""
    from torch.profiler import ProfilerActivity, profile

    def counts(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, prompts, steps, temperature=0, stop_token_ids=[model.config.vocab_size - 1], **kw)
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        issued = sum(e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::") for e in events)
        syncs = sum(e.name in ("aten::_local_scalar_dense", "aten::nonzero") for e in events)
        return collections.Counter(issued=issued, all=len(events), syncs=syncs)

    a, b = counts(short), counts(long)
    return tuple((b[k] - a[k]) / (long - short) for k in ("issued", "all", "syncs"))


def bench_cuda_graphs(device, hbm_gbps, nano_layers, repeats):
    nano = dict(hidden_size=2688, vocab_size=131072, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, n_routed_experts=128,
                num_experts_per_tok=6, moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
                hybrid_override_pattern="MEM*E"[:nano_layers] if nano_layers <= 5 else "MEM*E" * (nano_layers // 5))
    print(f"\n5. CUDA graphs: decode tokens/s (64 new tokens after a 64-token prompt), HBM bound at {hbm_gbps} GB/s")
    print(f"{'model':>6} {'batch':>6} {'eager':>9} {'graphs':>9} {'bound':>9}")
    for name, cfg in (("small", SMALL), ("nano", nano)):
        torch.manual_seed(0)
        with torch.device(device):                                   # built on the GPU: no 5 GB CPU init
            model = Model(ModelConfig(**dict(cfg, moe_impl="auto"))).set_dtype(torch.bfloat16).eval()
        active = model.num_params()["active"] - model.backbone.embeddings.weight.numel()
        for B in (1, 16, 128):
            prompts = [list(range(3, 67))] * B
            rates = {}
            for graph in (False, True):
                run_ours(model, prompts, 4, cuda_graph=graph)                                  # warm-up
                ts = [timed(lambda: run_ours(model, prompts, 64, cuda_graph=graph), torch.cuda.synchronize)[0][0] -
                      timed(lambda: run_ours(model, prompts, 1, cuda_graph=graph), torch.cuda.synchronize)[0][0]
                      for _ in range(repeats)]
                rates[graph] = B * 63 / statistics.median(ts)
            cache = model.new_cache(B, 128)
            cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers if layer for t in layer.values())
            step_bytes = active * 2 + cache_bytes                     # bf16 weights (all experts touched at B>=16)
            print(f"{name:>6} {B:>6} {rates[False]:>9,.0f} {rates[True]:>9,.0f} "
                  f"{B * hbm_gbps * 1e9 / step_bytes:>9,.0f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per measurement")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="prompts per greedy generate call")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (greedy)")
    ap.add_argument("--group", type=int, nargs=3, default=[8, 8, 128], metavar=("PROMPTS", "N", "TOKENS"),
                    help="group sampling shape (0 0 0 = skip)")
    ap.add_argument("--ttft-len", type=int, default=2048, help="prompt length for time to first token (0 = skip)")
    ap.add_argument("--no-profile", action="store_true", help="skip the ops / host syncs per step section")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hbm-gbps", type=float, default=4800, help="GPU memory bandwidth for the bound (H200: 4800)")
    ap.add_argument("--nano-layers", type=int, default=5, help="layers of the Nano-shaped model on CUDA")
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

    def prompts_of(B):
        return [torch.randint(3, V, (n,), generator=g).tolist() for n in torch.randint(32, 129, (B,), generator=g)]

    print(f"\n1. greedy, {args.new_tokens} new tokens per prompt, prompts of 32-128 tokens; the same calls split "
          f"into the prefill (a call for 1 token) and a decode step (the rest, per token), ours / hf")
    print(f"{'prompts':>8} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio wall':>11} {'ratio cpu':>10} {'rows agree':>11}"
          f" {'prefill ms':>14} {'step ms':>12}")
    for B in args.batches:
        prompts = prompts_of(B)
        ids, mask = left_pad(prompts, device)
        t_o, t_t, wall, cpu, outs = interleaved(lambda: run_ours(ours, prompts, args.new_tokens),
                                                lambda: run_theirs(theirs, ids, mask, args.new_tokens),
                                                args.repeats, sync)
        p_o, p_t, *_ = interleaved(lambda: run_ours(ours, prompts, 1), lambda: run_theirs(theirs, ids, mask, 1),
                                   args.repeats, sync)
        n_tok, steps = B * args.new_tokens, args.new_tokens - 1
        agree = sum(a == b for a, b in zip(outs["ours"], outs["theirs"])) / B
        print(f"{B:>8} {n_tok / t_o:>11,.0f} {n_tok / t_t:>9,.0f} {wall:>10.2f}x {cpu:>9.2f}x {agree:>10.0%}"
              f" {p_o * 1e3:>6,.0f} / {p_t * 1e3:<5,.0f} {(t_o - p_o) / steps * 1e3:>5.1f} / "
              f"{(t_t - p_t) / steps * 1e3:<5.1f}", flush=True)

    P, n, T = args.group
    if P:
        print(f"\n2. group sampling, {P} prompts x {n} completions x {T} tokens, temperature 1")
        prompts = prompts_of(P)
        ids, mask = left_pad(prompts, device)
        t_o, t_t, wall, cpu, _ = interleaved(lambda: run_ours(ours, prompts, T, temperature=1.0, n=n, seed=0),
                                             lambda: run_theirs(theirs, ids, mask, T, n=n, sample=True),
                                             args.repeats, sync)
        print(f"ours {P * n * T / t_o:,.0f} tok/s, hf {P * n * T / t_t:,.0f} tok/s: {wall:.2f}x wall, {cpu:.2f}x cpu",
              flush=True)

    if not args.no_profile:
        print("\n3. aten ops and host syncs per decode step (16 prompts): issued / all / syncs")
        no_moe = Model(ModelConfig(**dict(SMALL, hybrid_override_pattern="M-M*-M-M*-"))).to(device).eval()
        prompts = prompts_of(16)
        for label, model in (("with MoE", ours), ("no MoE", no_moe)):
            for loop, kw in (("reference", dict(reference=True)), ("fixed-slot", {})):
                issued, every, syncs = step_profile(model, prompts, **kw)
                print(f"  {label:>8} {loop:>10}: {issued:7.1f} {every:7.1f} {syncs:6.2f}", flush=True)

    if args.ttft_len:
        prompt = [torch.randint(3, V, (args.ttft_len,), generator=g).tolist()]
        ids, mask = left_pad(prompt, device)
        t_o, t_t, wall, _, _ = interleaved(lambda: run_ours(ours, prompt, 1), lambda: run_theirs(theirs, ids, mask, 1),
                                           args.repeats, sync)
        print(f"\n4. time to first token, one {args.ttft_len}-token prompt: ours {t_o * 1e3:,.0f} ms, "
              f"hf {t_t * 1e3:,.0f} ms ({wall:.2f}x)")

    if device.startswith("cuda"):
        bench_cuda_graphs(device, args.hbm_gbps, args.nano_layers, args.repeats)


if __name__ == "__main__":
    main()
