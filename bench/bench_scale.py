"""
The real-scale path, measured on CPU and modelled at size.

1. One training step (forward + backward of the chunked log-probs over packed documents of 1,500 tokens) of a
   small hybrid config at T = 4K and 16K tokens: peak resident memory added by the step and wall time, each in a
   fresh process. Run it with PYTHONPATH at another checkout to get that tree's figures (before/after):
       python bench/bench_scale.py step
       git archive REV | tar -x -C /tmp/before && PYTHONPATH=/tmp/before python bench/bench_scale.py step
2. The memory model (memory.memory_model) for the 30B presets on 8 GPUs, against 8 x H200 (141 GB) and
   8 x H100 (80 GB):
       python bench/bench_scale.py table
"""
import json
import os
import subprocess
import sys

STEP = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from model import Model, ModelConfig
T = int(sys.argv[1])
cfg = ModelConfig(vocab_size=4096, hidden_size=256, hybrid_override_pattern="MEM*EMEM*E", num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32, mamba_num_heads=16, mamba_head_dim=32, n_groups=2,
                  ssm_state_size=64, chunk_size=64, n_routed_experts=16, num_experts_per_tok=4,
                  moe_intermediate_size=256, moe_shared_expert_intermediate_size=512, moe_impl="torch")
torch.manual_seed(0)
model = Model(cfg).train()
ids, doc = torch.randint(0, 4096, (1, T)), (torch.arange(T) // 1500)[None]
model.token_logprobs(ids[:, :256], ids[:, :256], doc_ids=doc[:, :256]).sum().backward()
model.zero_grad(set_to_none=True)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before, t0 = peak(), time.perf_counter()
model.token_logprobs(ids, ids, doc_ids=doc).sum().backward()
print(json.dumps(dict(T=T, peak_added_mb=(peak() - before) / 2**20, seconds=time.perf_counter() - t0)))
"""


def step():
    for T in (4096, 16384):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", STEP, str(T)], capture_output=True, text=True, env=env)
        print(out.stdout.strip() or out.stderr[-2000:])


# (preset, tokens per row, rows per forward): SFT packs seq_len rows; RL and MOPD pack rollouts (prompt +
# response: max_new_tokens 49152 plus about 1K of prompt) into one row of micro_batch_tokens per forward.
PRESETS = [("sft_nano_30b (seq_len from the preset)", None, 1),
           ("rl_nano_30b, 4 rows of 50176", 50176, 4), ("rl_nano_30b, micro_batch_tokens 50176", 50176, 1),
           ("mopd_nano_30b, 4 rows of 50176", 50176, 4), ("mopd_nano_30b, micro_batch_tokens 50176", 50176, 1)]


def table():
    from memory import memory_model
    from model import ModelConfig
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = ModelConfig.from_json(os.path.join(root, "configs", "nemotron3_nano_30b_a3b.json"))
    with open(os.path.join(root, "configs", "sft_nano_30b.json")) as f:
        sft_len = json.load(f)["seq_len"]
    print("| run | tokens per forward | AC | params+grads+adam | gathered | activations | total GB/GPU | "
          "8xH200 | 8xH100 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row, rows in PRESETS + [("sft at 32K", 32768, 1), ("sft at 16K", 16384, 1), ("sft at 8K", 8192, 1)]:
        row = row or sft_len
        for ac in (True, False):
            t = memory_model(config, row, 8, rows, activation_checkpointing=ac)["train"]
            fits = ["fits" if t["total"] <= 0.9 * cap else "no" for cap in (141e9, 80e9)]
            print(f"| {name} | {rows} x {row} | {'on' if ac else 'off'} | "
                  f"{(t['params'] + t['grads'] + t['adam']) / 1e9:.1f} | {t['gathered'] / 1e9:.1f} | "
                  f"{t['activations'] / 1e9:.1f} | {t['total'] / 1e9:.1f} | {fits[0]} | {fits[1]} |")
    m = memory_model(config, 50176, 8, sample_rows=4)["sample"]
    print(f"\nsampling (RL, MOPD: sample_batch 4 rows of 50K positions): params gathered {m['params'] / 1e9:.1f} GB, "
          f"cache {m['cache_per_row'] / 1e9:.2f} GB per row, total {m['total'] / 1e9:.1f} GB")


if __name__ == "__main__":
    {"step": step, "table": table}[sys.argv[1] if len(sys.argv) > 1 else "table"]()
