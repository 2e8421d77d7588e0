"""
Benchmark the model against transformers' NemotronHForCausalLM on the same weights (CPU by default).

1. Forward + backward time of a small model (hidden 256, 10 layers of all kinds, 32 experts, top-4, 4 x 256
   tokens): ours vs transformers, interleaved runs, median ratio (> 1 means we are faster).
2. Peak extra memory of token log-probs + backward at vocab 131072: the chunked `token_logprobs` vs the plain
   log_softmax of full logits. Each variant runs in a fresh process; the peak is the high-water mark of resident
   memory (VmHWM, reset just before the run through /proc/self/clear_refs) minus the resident memory before it.

    python bench/bench_model.py [--repeats 7] [--device cpu]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from model import Model, ModelConfig  # noqa: E402

SMALL = dict(vocab_size=4096, hidden_size=256, hybrid_override_pattern="MEM*EMEM*E", num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=64,
             n_groups=2, chunk_size=64, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
             moe_shared_expert_intermediate_size=512, intermediate_size=512, moe_impl="torch")


def fwd_bwd(step, sync):
    t0 = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t0


def bench_speed(repeats, device):
    from transformers import NemotronHForCausalLM
    torch.manual_seed(0)
    ours = Model(ModelConfig(**SMALL)).to(device)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = NemotronHForCausalLM.from_pretrained(d, dtype=torch.float32).to(device)
    ours.train(), theirs.train()
    ids = torch.randint(0, SMALL["vocab_size"], (4, 256), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step_ours():
        ours.zero_grad(set_to_none=True)
        ours(ids).float().logsumexp(-1).mean().backward()

    def step_theirs():
        theirs.zero_grad(set_to_none=True)
        theirs(ids).logits.float().logsumexp(-1).mean().backward()

    for _ in range(2):                                     # warm-up
        fwd_bwd(step_ours, sync), fwd_bwd(step_theirs, sync)
    t_ours, t_theirs = [], []
    for _ in range(repeats):                               # interleaved, so drift hits both alike
        t_ours.append(fwd_bwd(step_ours, sync))
        t_theirs.append(fwd_bwd(step_theirs, sync))
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    ratios = [b / a for a, b in zip(t_ours, t_theirs)]
    print(f"forward+backward, 4 x 256 tokens, {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, "
          f"{device}, {torch.get_num_threads()} threads, median of {repeats}")
    print(f"  {'nanocascade':<14} {mo * 1e3:8.1f} ms   {4 * 256 / mo:9.0f} tok/s")
    print(f"  {'transformers':<14} {mt * 1e3:8.1f} ms   {4 * 256 / mt:9.0f} tok/s")
    print(f"  speed-up (transformers / ours): median of per-pair ratios {statistics.median(ratios):.2f}x")


def memory_child(variant):
    """Runs in a fresh process: prints the peak extra resident memory (MB) of one logprob forward + backward."""
    torch.manual_seed(0)
    cfg = ModelConfig(**(SMALL | dict(vocab_size=131072, hybrid_override_pattern="M*E")))
    model = Model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 1024))
    targets = torch.randint(0, cfg.vocab_size, (2, 1024))
    if variant == "full":
        run = lambda: torch.log_softmax(model(ids).float(), -1).gather(-1, targets[..., None]).sum()  # noqa: E731
    else:
        run = lambda: model.token_logprobs(ids, targets).sum()  # noqa: E731
    def status_kb(key):
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                       # reset the peak-RSS counter to the current RSS
    base = status_kb("VmRSS")
    run().backward()
    print((status_kb("VmHWM") - base) / 1024)


def bench_memory():
    print("peak extra memory of log-probs + backward, 2 x 1024 tokens, vocab 131072 (fresh process each)")
    mb = {}
    for variant in ("full", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", variant], capture_output=True, text=True,
                             check=True)
        mb[variant] = float(out.stdout.strip().splitlines()[-1])
        print(f"  {variant:<8} {mb[variant]:8.0f} MB")
    print(f"  full / chunked: {mb['full'] / max(mb['chunked'], 1):.1f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per implementation")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--skip-memory", action="store_true", help="only the speed comparison")
    ap.add_argument("--memory-child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
    else:
        bench_speed(args.repeats, args.device)
        if not args.skip_memory:
            bench_memory()
