"""The real-scale path, shown on CPU: checkpoint fallback, collectives only when needed, mixed precision inside
FSDP2, fp32 lm_head gradient accumulation, meta-device init, mask-free attention, bounded scan memory, the memory
model and the data cache."""
import json
import os
import types

import numpy as np
import pytest
import torch

import common
import options
import sft
from model import Model
from tests.conftest import small_config
from tests.test_sft import losses, run_dir, run_inprocess, tok  # noqa: F401  (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


# -- distributed hygiene -----------------------------------------------------------------------------------------


def _ckpt(tmp_path, steps, keep_last=10):
    model = Model(small_config())
    opt = common.make_optimizer(model, 1e-3, (0.9, 0.95), 0.1)
    ck = common.Checkpointer(str(tmp_path), common.Dist(), keep_last=keep_last)
    for s in steps:
        ck.save(s, model, opt, {})
    return ck, model, opt


def test_latest_falls_back_to_newest_complete_checkpoint(tmp_path):
    ck, model, opt = _ckpt(tmp_path, [2, 4, 6])
    os.remove(os.path.join(ck.dir, "step_0000006", "trainer_state.json"))
    assert ck.latest() == os.path.join(ck.dir, "step_0000004")   # marker names an incomplete one
    os.remove(os.path.join(ck.dir, "latest"))
    assert ck.latest() == os.path.join(ck.dir, "step_0000004")   # no marker
    with open(os.path.join(ck.dir, "latest"), "w") as f:
        f.write("step_0000099")
    assert ck.latest() == os.path.join(ck.dir, "step_0000004")   # marker names a missing directory


def test_keep_last_never_deletes_the_resumed_checkpoint_nor_new_ones(tmp_path):
    ck, model, opt = _ckpt(tmp_path, [2, 4, 100])
    with open(os.path.join(ck.dir, "latest"), "w") as f:
        f.write("step_0000004")                                      # roll back: step_100 is an abandoned future
    ck = common.Checkpointer(str(tmp_path), common.Dist(), keep_last=1)
    ck.load(ck.latest(), model, opt)
    ck.save(6, model, opt, {})
    ck.save(8, model, opt, {})
    assert ck.complete() == ["step_0000004", "step_0000008", "step_0000100"]
    assert ck.latest().endswith("step_0000008")


def test_run_with_broken_latest_marker_resumes(run_dir):  # noqa: F811
    run_inprocess(run_dir, max_steps=4, save_every=2)
    before = losses(run_dir / "out")
    os.remove(run_dir / "out" / "checkpoints" / "latest")
    run_inprocess(run_dir, max_steps=6, save_every=2)
    after = losses(run_dir / "out")
    assert [s for s, _ in after] == [1, 2, 3, 4, 5, 6] and after[:4] == before  # steps 1-4 not redone
    assert sorted(os.listdir(run_dir / "out" / "checkpoints")) == ["latest", "step_0000004", "step_0000006"]


def test_tokens_per_s_counts_real_tokens_not_padding(run_dir, monkeypatch):  # noqa: F811
    clock = iter(range(10**6))
    monkeypatch.setattr(sft, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    run_inprocess(run_dir, max_steps=3, eval_every=0, save_every=0)
    rows = common.read_metrics(run_dir / "out" / "metrics.jsonl")
    # each step's clock reads are one tick apart, so tokens_per_s is the step's count of non-padding tokens
    for r in rows:
        assert r["tokens_per_s"] == int(r["tokens_per_s"]) and r["tokens"] < r["tokens_per_s"] < 4 * 128


def test_balance_experts_all_reduces_only_when_balancing(monkeypatch):
    calls = []
    monkeypatch.setattr(common.dist, "all_reduce", lambda t, *a, **k: calls.append(t.shape))
    model = Model(small_config()).train()
    two = common.Dist(world_size=2)
    model(torch.randint(0, 101, (2, 9))).sum().backward()
    assert common.balance_experts(model, two) > 1.0 and calls == []          # off: no collective, metric kept
    for m in model.modules():
        if hasattr(m, "update_correction_bias"):
            m.cfg.moe_bias_update_rate = 1e-3
    model(torch.randint(0, 101, (2, 9))).sum().backward()
    common.balance_experts(model, two)
    assert calls == [torch.Size([2, 6])]                                      # on: one all-reduce, every layer
    bias = model.backbone.layers[2].mixer.gate.e_score_correction_bias
    assert bias.abs().max() == pytest.approx(1e-3)


# -- mixed precision ---------------------------------------------------------------------------------------------


def torchrun(script, nproc=2, timeout=300):
    import sys

    from tests.test_sft import run_killing_group
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    out = run_killing_group(cmd, timeout=timeout, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


DTYPES_SCRIPT = """
import json, sys, torch, common
from model import Model
from tests.conftest import small_config
d = common.init_dist("cpu")
torch.manual_seed(0)
model = common.shard_model(Model(small_config()), d, bf16=True)
seen = {}
def record(name, tensor):
    seen.setdefault(name, set()).add(str(tensor.dtype))
for i, layer in enumerate(model.backbone.layers):
    def pre(mod, args, kind=layer.kind):
        if kind == "mamba":
            record("A_log", mod.A_log); record("D", mod.D)
        if kind == "moe":
            record("gate", mod.gate.weight); record("bias", mod.gate.e_score_correction_bias)
        if kind == "attention":
            record("q_proj", mod.q_proj.weight)
    layer.mixer.register_forward_pre_hook(pre)
    if layer.kind == "mamba":       # gathered by their own (bf16) group as they are called
        layer.mixer.in_proj.register_forward_pre_hook(lambda mod, args: record("in_proj", mod.weight))
    if layer.kind == "moe":
        layer.mixer.experts.register_forward_pre_hook(lambda mod, args: record("experts", mod.up_proj))
    layer.register_forward_hook(lambda mod, args, out: record("residual", out))
ids = torch.randint(0, 101, (2, 12))
model.token_logprobs(ids, ids).sum().backward()
grads = {n: str(p.grad.dtype) for n, p in model.named_parameters()}
if d.is_main:
    json.dump(dict(seen={k: sorted(v) for k, v in seen.items()}, grads=grads), open(sys.argv[1], "w"))
common.close_dist()
"""


def test_fp32_tensors_stay_fp32_inside_the_bf16_fsdp_forward(tmp_path):
    script = tmp_path / "dtypes.py"
    script.write_text(DTYPES_SCRIPT.replace("sys.argv[1]", repr(str(tmp_path / "seen.json"))))
    torchrun(str(script))
    got = json.loads((tmp_path / "seen.json").read_text())
    assert got["seen"] == {"A_log": ["torch.float32"], "D": ["torch.float32"], "gate": ["torch.float32"],
                           "bias": ["torch.float32"], "in_proj": ["torch.bfloat16"],
                           "experts": ["torch.bfloat16"], "q_proj": ["torch.bfloat16"],
                           "residual": ["torch.bfloat16"]}
    assert set(got["grads"].values()) == {"torch.float32"}          # the sharded master gradients


def test_lm_head_weight_gradient_accumulates_in_fp32_at_long_t():
    """bf16 h and W, 65536 tokens in 2048 chunks: the summed weight gradient against fp64 arithmetic on the same
    values. A bf16 running sum over the chunks is 13% off here; fp32 accumulation leaves only the final rounding."""
    from model import ChunkedLogprobs
    torch.manual_seed(0)
    N, H, V = 65536, 64, 256
    h, W = torch.randn(N, H).bfloat16(), (torch.randn(V, H) * 0.5).bfloat16()
    targets = torch.randint(0, V, (N,))
    targets[::7] = -100                                                 # ignored positions carry no gradient
    p = torch.softmax(h.double() @ W.double().T, -1)
    dlogits = -p
    dlogits[torch.arange(N), targets.clamp(min=0)] += 1
    ref = (dlogits * (targets >= 0)[:, None]).T @ h.double()
    w = W.clone().requires_grad_()
    ChunkedLogprobs.apply(h, w, targets, 1.0, 32).sum().backward()
    assert w.grad.dtype == torch.bfloat16
    assert ((w.grad.double() - ref).norm() / ref.norm()).item() < 5e-3


# -- from scratch at size: meta device, sharded, initialised on the shards ---------------------------------------


MIDSIZE = dict(vocab_size=32768, hidden_size=512, hybrid_override_pattern="MEM*EMEM*E", num_attention_heads=8,
               num_key_value_heads=2, head_dim=64, mamba_num_heads=16, mamba_head_dim=32, n_groups=2,
               ssm_state_size=32, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
               moe_shared_expert_intermediate_size=512)

BUILD_SCRIPT = """
import json, resource, sys, types, torch, common, sft
from model import Model, ModelConfig
d = common.init_dist("cpu")
cfg = types.SimpleNamespace(model=sys.argv[1], bf16=False, activation_checkpointing=False, seed=3,
                            moe_bias_update_rate=0.0)
with torch.device("meta"):     # the lazy imports of a first model build, outside the measurement
    Model(ModelConfig.from_json(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = sft.build_model(cfg, d)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
local = sum(p.to_local().numel() * 4 for p in model.parameters())
full = common.full_state_dict(model, d)
if d.is_main:
    with torch.device("meta"):
        ref = Model(ModelConfig.from_json(sys.argv[1]))
    ref.to_empty(device="cpu").init_weights(torch.Generator().manual_seed(3))
    same = all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
    total = sum(p.numel() * 4 for p in ref.parameters())
    json.dump(dict(grown=grown, local=local, total=total, same=same), open(sys.argv[2], "w"))
common.close_dist()
"""


def test_midsize_model_from_scratch_never_whole_on_one_process(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps(small_config(**MIDSIZE).to_hf()))
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT.replace("sys.argv[1]", repr(str(tmp_path / "model.json")))
                      .replace("sys.argv[2]", repr(str(tmp_path / "out.json"))))
    torchrun(str(script))
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["total"] > 400e6                              # 110M parameters in fp32
    assert got["same"]                                       # the shards are the one-process init
    assert got["local"] <= got["total"] / 2 + 1e6
    # the peak resident memory building it grew by about this process's shard, never the whole model
    assert got["grown"] < 0.7 * got["total"], got


# -- attention without a dense mask ------------------------------------------------------------------------------


def _dense_attention(q, k, v, doc_ids):
    """The reference: SDPA with the dense [B, 1, T, T] mask of the old path."""
    from model import build_attn_mask
    mask = build_attn_mask(q.shape[2], torch.ones_like(doc_ids, dtype=torch.bool), 0, doc_ids, doc_ids)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def test_segment_attention_equals_dense_mask_values_and_gradients():
    from model import Segments, segment_attention
    torch.manual_seed(0)
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 3 + [-1] * 3,      # packed documents, padding at the end
                            [-2] * 6 + [0] * 14,                          # left padding
                            [0] * 20])
    q, k, v = (torch.randn(3, h, 20, 8, requires_grad=True) for h in (4, 2, 2))
    out = segment_attention(q, k, v, Segments(doc_ids))
    ref = _dense_attention(q, k, v, doc_ids)
    real = (doc_ids >= 0)[:, None, :, None]               # padding outputs are never used by a real token
    torch.testing.assert_close(out * real, ref * real, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad((out * real).square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * real).square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_packed_and_left_padded_model_outputs_match_the_dense_path(monkeypatch):
    """The whole model with Segments against the same model forced onto the old dense-mask path."""
    import model as model_lib
    torch.manual_seed(0)
    m = Model(small_config())
    ids = torch.randint(0, 101, (2, 24))
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 7 + [1] * 7 + [2] * 6 + [-1] * 4])
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :9] = 0
    targets = torch.randint(0, 101, (2, 24))
    new = [m.token_logprobs(ids, targets, doc_ids=doc_ids), m(ids, attention_mask=mask)]
    new_grads = torch.autograd.grad(new[0].sum(), list(m.parameters()))

    def dense(q, k, v, segments):   # the old path: each run (document or padding) in a dense [B, 1, T, T] mask
        runs = torch.zeros(q.shape[0], q.shape[2], dtype=torch.long)
        for b, spans in enumerate(segments.spans):
            for i, (s, e) in enumerate(spans):
                runs[b, s:e] = i
        return _dense_attention(q, k, v, runs)
    monkeypatch.setattr(model_lib, "segment_attention", dense)
    old = [m.token_logprobs(ids, targets, doc_ids=doc_ids), m(ids, attention_mask=mask)]
    old_grads = torch.autograd.grad(old[0].sum(), list(m.parameters()))
    torch.testing.assert_close(new[0], old[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[1][1, 9:], old[1][1, 9:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[1][0], old[1][0], atol=1e-5, rtol=1e-5)
    for g, r in zip(new_grads, old_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


ATTN_MEMORY_SCRIPT = """
import json, resource, sys, time, torch
from model import Segments, segment_attention
from tests.test_scale import _dense_attention
torch.manual_seed(0)
T = 16384
doc_ids = (torch.arange(T) // 1500)[None]                   # eleven packed documents
q, k, v = (torch.randn(1, h, T, 16, requires_grad=True) for h in (2, 1, 1))
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {}
for name, fn in (("segments", lambda: segment_attention(q, k, v, Segments(doc_ids))),
                 ("dense", lambda: _dense_attention(q, k, v, doc_ids))):
    before, t0 = peak(), time.perf_counter()       # the dense path goes second: its growth is above the first peak
    fn().square().sum().backward()
    out[name] = dict(grown=peak() - before, seconds=time.perf_counter() - t0)
    q.grad = k.grad = v.grad = None
print(json.dumps(out))
"""


def test_segment_attention_peak_memory_at_16k_is_a_fraction_of_the_dense_mask():
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", ATTN_MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(got)
    assert got["dense"]["grown"] > 256 * 2**20                # the [1, 1, T, T] bool mask alone is 256 MiB
    assert got["segments"]["grown"] < got["dense"]["grown"] / 8


# -- Mamba: memory per token bounded -----------------------------------------------------------------------------


def _mixer_inputs(cfg, T, seed=0):
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, T, cfg.hidden_size, generator=g, requires_grad=True)
    doc_ids = torch.cumsum(torch.rand(2, T, generator=g) < 0.05, dim=1)            # documents across segments
    K = cfg.conv_kernel
    prev = F.pad(doc_ids, (K - 1, 0), value=-1).unfold(1, K, 1)
    doc = dict(reset=F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0), value=True),
               same_doc=prev == doc_ids.unsqueeze(-1))
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :7] = False                                                              # left padding
    return u, valid, doc


def test_segmented_mamba_equals_the_whole_sequence_values_and_gradients():
    from model import Mamba2Mixer
    from tests.test_model import randomize
    cfg = small_config()
    mixer = randomize(Model(cfg)).backbone.layers[0].mixer
    assert isinstance(mixer, Mamba2Mixer)
    u, valid, doc = _mixer_inputs(cfg, 61)
    results = []
    for segment_tokens in (10**9, 12, 5):                    # whole; segments across chunks (8) and documents
        mixer.segment_tokens = segment_tokens
        out = mixer(u, valid=valid, doc=doc)
        grads = torch.autograd.grad(out.square().sum(), [u] + list(mixer.parameters()))
        results.append((out, grads))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, results[0][1]):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def _saved_bytes_per_token(mixer, T):
    """Bytes autograd keeps for backward after one forward, per token (distinct storages, parameters excluded)."""
    u, valid, doc = _mixer_inputs(mixer.cfg, T)
    params = {p.untyped_storage().data_ptr() for p in mixer.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mixer(u, valid=valid, doc=doc)
    return sum(seen.values()) / u.shape[0] / T


def test_mamba_memory_per_token_is_bounded():
    from model import ModelConfig
    cfg = ModelConfig(vocab_size=64, hidden_size=256, hybrid_override_pattern="M", mamba_num_heads=16,
                      mamba_head_dim=32, n_groups=2, ssm_state_size=64, chunk_size=64)
    mixer = Model(cfg).backbone.layers[0].mixer
    mixer.segment_tokens = 256
    short, long = _saved_bytes_per_token(mixer, 512), _saved_bytes_per_token(mixer, 2048)
    # kept per token: the in_proj output, the gated norm's output (out_proj's input) and u, in fp32; plus one
    # carried [h, p, n] state per segment
    bound = 4 * (mixer.in_proj.out_features + mixer.d_inner + cfg.hidden_size) + \
        4 * 3 * mixer.n_heads * mixer.head_dim * mixer.d_state / mixer.segment_tokens
    assert short <= 1.1 * bound and long <= 1.1 * bound, (short, long, bound)
    mixer.segment_tokens = 10**9                            # unsegmented: the decay matrices and fp32 copies stay
    assert _saved_bytes_per_token(mixer, 512) > 3 * bound


# -- the memory model against measured peaks ---------------------------------------------------------------------


MEMORY_SCRIPT = """
import json, resource, sys, torch
torch.set_num_threads(1)
from memory import memory_model
from model import Model, ModelConfig
ac, T = sys.argv[1] == "1", int(sys.argv[2])
cfg = ModelConfig(vocab_size=4096, hidden_size=256, hybrid_override_pattern="MEM*EMEM*E", num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32, mamba_num_heads=16, mamba_head_dim=32, n_groups=2,
                  ssm_state_size=64, chunk_size=64, n_routed_experts=16, num_experts_per_tok=4,
                  moe_intermediate_size=256, moe_shared_expert_intermediate_size=512, moe_impl="torch")
train = memory_model(cfg, T, 1, bf16=False, activation_checkpointing=ac)["train"]
torch.manual_seed(0)
model = Model(cfg).train()
model.gradient_checkpointing = ac
ids, doc = torch.randint(0, 4096, (1, T)), (torch.arange(T) // 700)[None]
model.token_logprobs(ids[:, :128], ids[:, :128], doc_ids=doc[:, :128]).sum().backward()   # lazy allocations
model.zero_grad(set_to_none=True)
# anonymous resident memory (resident minus file-backed pages, which a busy machine may evict from under us),
# sampled every millisecond by a thread while the step runs
import threading, time
anon = lambda: (lambda f: (int(f[1]) - int(f[2])) * 4096)(open("/proc/self/statm").read().split())
before, peak, running = anon(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
thread = threading.Thread(target=sample)
thread.start()
model.token_logprobs(ids, ids, doc_ids=doc).sum().backward()
running[0] = False
thread.join()
print(json.dumps(dict(measured=peak[0] - before, predicted=train["grads"] + train["activations"] + train["logprobs"])))
"""


@pytest.mark.parametrize("activation_checkpointing,T", [(False, 4096), (True, 8192)])
def test_memory_model_within_20_percent_of_measured_peak(activation_checkpointing, T):
    """One process, fp32: what a training step adds to the peak (gradients, activations, log-prob chunks) against
    the memory model's figure for the same config and tokens. The 8192 case runs the Mamba layers in segments."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(int(activation_checkpointing)), str(T)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.8 < got["predicted"] / got["measured"] < 1.2, got


def test_memory_cli_prints_train_and_sample_bytes():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "model.py", "configs/tiny_model.json", "--memory", "--seq_len", "1024",
                          "--gpus", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "activation checkpointing on" in out.stdout and "sampling: params gathered" in out.stdout


# -- the data cache ----------------------------------------------------------------------------------------------


def _data_cfg(run_dir, **kw):  # noqa: F811
    from tests.test_sft import args_for
    return options.parse_config(sft.SFTConfig, args_for(run_dir, cache_dir=run_dir / "cache", **kw))


def test_data_cache_is_reused_and_rebuilt_when_its_key_changes(run_dir, tok, monkeypatch):  # noqa: F811
    d = common.Dist()
    train, val, mix = sft.build_rows(_data_cfg(run_dir), tok, d)
    assert isinstance(train[0], np.memmap) and train[0].dtype == np.int32 and mix is None
    real = sft.tokenize
    calls = []
    monkeypatch.setattr(sft, "tokenize", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    again, val2, _ = sft.build_rows(_data_cfg(run_dir), tok, d)               # the second run reads the cache
    assert calls == [] and all(np.array_equal(a, b) for a, b in zip(train + val, again + val2))
    sft.build_rows(_data_cfg(run_dir, seq_len=96), tok, d)                     # another seq_len: rebuilt
    assert len(calls) == 2
    other = sft.load_tokenizer(os.path.join(ROOT, "data", "tokenizer.json"))
    other.tokenizer.add_special_tokens(["<|new|>"])                            # another tokenizer: rebuilt
    sft.build_rows(_data_cfg(run_dir), other, d)
    assert len(calls) == 4
    assert len(os.listdir(run_dir / "cache")) == 3


def test_mixture_weights_set_each_sources_share_of_an_epoch(run_dir, tok):  # noqa: F811
    rows = (run_dir / "sft.jsonl").read_text().splitlines()
    (run_dir / "a.jsonl").write_text("\n".join(rows[:24]) + "\n")
    (run_dir / "b.jsonl").write_text("\n".join(rows[24:]) + "\n")
    cfg = _data_cfg(run_dir, train_mix=f"{run_dir / 'a.jsonl'}:3,{run_dir / 'b.jsonl'}:0.5", val_fraction=0)
    train, _, mix = sft.build_rows(cfg, tok, common.Dist())
    (a0, na, wa), (b0, nb, wb) = mix
    assert (a0, wa, b0, wb) == (0, 3.0, na, 0.5) and na + nb == len(train[0])
    epoch = sft.row_order(len(train[0]), 0, 0, mix)
    from_a = int((epoch < na).sum())
    assert from_a == 3 * na and len(epoch) - from_a == round(0.5 * nb)
    assert sorted(set(epoch[epoch < na].tolist())) == list(range(na))          # every row of a, three times
    assert sft.rows_for_step(1, 4, len(train[0]), 0, mix) == epoch[4:8].tolist()
    with pytest.raises(options.ConfigError, match="SOURCE:WEIGHT"):
        sft.mix_sources(types.SimpleNamespace(train_mix="a.jsonl", train_data="", train_subset=""))


def test_two_processes_read_their_rows_from_one_cache(run_dir):  # noqa: F811
    from tests.test_sft import run_subprocess
    one = run_subprocess(run_dir, out="one", max_steps=3, save_every=0, eval_every=0)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_subprocess(run_dir, nproc=2, out="two", max_steps=3, save_every=0, eval_every=0, micro_batch=1,
                         cache_dir=run_dir / "cache")
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(os.listdir(run_dir / "cache")) == 1                              # built once, by rank 0
    np.testing.assert_allclose([v for _, v in losses(run_dir / "one")], [v for _, v in losses(run_dir / "two")],
                               rtol=1e-5, atol=1e-5)
