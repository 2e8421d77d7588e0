"""The model against transformers' NemotronHForCausalLM, its scan against the plain recurrence, its cache against
the full forward, packed against unpacked documents, and its checkpoint I/O and config errors."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import Model, ModelConfig, ssd_scan
from tests.conftest import small_config


def randomize(model: Model, seed=0):
    """Random weights everywhere the math could hide a mistake: norms, D, conv bias, the correction bias (large
    enough to change which experts are picked), and dt_bias with softplus well above transformers' 1e-3 clamp."""
    g = torch.Generator().manual_seed(seed)
    model.init_weights(generator=g)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("conv1d.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("dt_bias"):
                p.copy_(torch.empty(p.shape).uniform_(-3, 0, generator=g))
    return model


def hf_logits(path, ids):
    """Logits of transformers' NemotronHForCausalLM loaded from `path`: a full forward, so no cache (transformers
    5.25's DynamicCache fails on a model whose first layer is an MLP)."""
    from transformers import NemotronHForCausalLM
    model, info = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()(ids, use_cache=False).logits


PARITY_CASES = [
    # every layer kind, GQA, 3 chunks with a ragged last one
    (dict(), 2, 21),
    # n_groups=4, odd chunk size, MQA (1 kv head), top-1
    (dict(hybrid_override_pattern="MEM*E", n_groups=4, chunk_size=5, num_key_value_heads=1, num_experts_per_tok=1),
     3, 17),
    # dense MLP first, one group, no GQA, length an exact multiple of the chunk
    (dict(hybrid_override_pattern="-M*M", n_groups=1, num_key_value_heads=4), 2, 16),
]


@pytest.mark.parametrize("overrides,batch,seqlen", PARITY_CASES)
def test_logits_match_transformers(tmp_path, overrides, batch, seqlen):
    model = randomize(Model(small_config(**overrides))).eval()
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        ref = hf_logits(tmp_path / "ckpt", ids)
    assert ours.shape == (batch, seqlen, model.config.vocab_size)
    assert (ours - ref).abs().max().item() < 1e-4


def sequential_scan(x, dt, A, B, C, initial_state=None, reset=None):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T;  y_t = S_t C_t — one step at a time."""
    b, T, h, p = x.shape
    g, n = B.shape[-2:]
    S = torch.zeros(b, h, p, n) if initial_state is None else initial_state.clone()
    ys = []
    for t in range(T):
        if reset is not None:
            S = S * (~reset[:, t]).float()[:, None, None, None]
        Bt = B[:, t].repeat_interleave(h // g, dim=1)
        Ct = C[:, t].repeat_interleave(h // g, dim=1)
        S = torch.exp(dt[:, t] * A)[..., None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ct))
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 40])
@pytest.mark.parametrize("with_state,with_reset", [(False, False), (True, False), (False, True)])
def test_chunked_scan_equals_sequential_recurrence(chunk_size, with_state, with_reset):
    g = torch.Generator().manual_seed(0)
    b, T, h, p, grp, n = 2, 19, 4, 3, 2, 5
    x = torch.randn(b, T, h, p, generator=g)
    dt = F.softplus(torch.randn(b, T, h, generator=g))
    A = -torch.rand(h, generator=g) * 2
    B, C = torch.randn(b, T, grp, n, generator=g), torch.randn(b, T, grp, n, generator=g)
    S0 = torch.randn(b, h, p, n, generator=g) if with_state else None
    reset = None
    if with_reset:
        reset = torch.zeros(b, T, dtype=torch.bool)
        reset[0, [0, 7, 8]] = True
        reset[1, [0, 16]] = True
    y, S = ssd_scan(x, dt, A, B, C, chunk_size, initial_state=S0, reset=reset)
    y_ref, S_ref = sequential_scan(x, dt, A, B, C, S0, reset)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S, S_ref, rtol=1e-4, atol=1e-4)


def test_cached_decoding_matches_full_forward():
    """Left-padded prefill, then one token at a time through the KV / conv / SSM caches, equals a full forward
    of each row alone."""
    model = randomize(Model(small_config())).eval()
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 101, (n,), generator=g) for n in (13, 5, 2)]
    steps = 6
    full = [torch.cat([r, torch.randint(3, 101, (steps,), generator=g)]) for r in rows]
    P = max(len(r) for r in rows)
    prompt = torch.zeros(len(rows), P, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        prompt[i, P - len(r):], mask[i, P - len(r):] = r, 1
    with torch.no_grad():
        cache = model.new_cache(len(rows), P + steps)
        logits = [model(prompt, attention_mask=mask, cache=cache)[:, -1]]
        for s in range(steps - 1):
            step_ids = torch.stack([f[len(r) + s] for f, r in zip(full, rows)]).unsqueeze(1)
            logits.append(model(step_ids, cache=cache)[:, -1])
        for i, (f, r) in enumerate(zip(full, rows)):
            ref = model(f[None, :len(r) + steps - 1])[0, len(r) - 1:]
            got = torch.stack([lg[i] for lg in logits])
            assert (got - ref).abs().max().item() < 1e-4, f"row {i}"


def test_cache_select_repeats_and_drops_rows():
    model = randomize(Model(small_config())).eval()
    ids = torch.randint(3, 101, (2, 9))
    with torch.no_grad():
        cache = model.new_cache(2, 12)
        model(ids, cache=cache)
        cache.select(torch.tensor([1, 1, 0]))                      # row 1 twice, then row 0
        nxt = torch.tensor([[5], [5], [7]])
        out = model(nxt, cache=cache)[:, -1]
        ref1 = model(torch.cat([ids[1], torch.tensor([5])])[None])[0, -1]
        ref0 = model(torch.cat([ids[0], torch.tensor([7])])[None])[0, -1]
    torch.testing.assert_close(out[0], ref1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[2], ref0, atol=1e-4, rtol=1e-4)


def test_packed_documents_equal_documents_alone():
    """Packing must not let documents see each other: block-diagonal attention, no conv taps across a boundary,
    and the SSM state restarting at each document (here across chunk boundaries too)."""
    model = randomize(Model(small_config())).eval()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 101, (n,), generator=g) for n in (7, 2, 12)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids)[0]
        start = 0
        for d in docs:
            ref = model(d[None])[0]
            assert (out[start:start + len(d)] - ref).abs().max().item() < 1e-4
            start += len(d)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_full_log_softmax(temperature):
    model = randomize(Model(small_config()))
    ids = torch.randint(0, 101, (2, 11))
    targets = torch.randint(0, 101, (2, 11))
    targets[1, :3] = -100                                          # ignored positions
    lp = model.token_logprobs(ids, targets, temperature=temperature, chunk_tokens=5)
    lp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = torch.log_softmax(model(ids).float() / temperature, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    full = torch.where(targets >= 0, full, 0.0)
    full.sum().backward()
    torch.testing.assert_close(lp, full, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_sharded_save_loads_in_ours_and_transformers(tmp_path):
    model = randomize(Model(small_config())).eval()
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "ckpt" / s).exists() for s in shards)
    assert "backbone.layers.2.mixer.experts.5.down_proj.weight" in index["weight_map"]
    ids = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        ref = model(ids)
        loaded = Model.from_pretrained(tmp_path / "ckpt").eval()
        torch.testing.assert_close(loaded(ids), ref, atol=0, rtol=0)
        assert (hf_logits(tmp_path / "ckpt", ids) - ref).abs().max().item() < 1e-4


def test_bf16_load_keeps_fp32_tensors(tmp_path):
    model = randomize(Model(small_config())).eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = Model.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        keep = name.endswith(("A_log", ".D", "e_score_correction_bias", "gate.weight"))
        assert t.dtype == (torch.float32 if keep else torch.bfloat16), name
    sd = model.state_dict()
    assert torch.equal(loaded.state_dict()["backbone.layers.2.mixer.gate.e_score_correction_bias"],
                       sd["backbone.layers.2.mixer.gate.e_score_correction_bias"])
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert (loaded(ids).float() - model(ids)).abs().max().item() < 0.1


def test_bad_checkpoint_lists_every_problem(tmp_path):
    Model(small_config()).save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    sd = load_file(path)
    del sd["backbone.layers.0.mixer.A_log"]
    sd["backbone.layers.0.mixer.surprise"] = torch.zeros(3)
    sd["backbone.layers.2.mixer.experts.1.up_proj.weight"] = torch.zeros(31, 64)
    save_file(sd, path)
    with pytest.raises(ValueError) as e:
        Model.from_pretrained(tmp_path / "ckpt")
    msg = str(e.value)
    assert "missing (1)" in msg and "backbone.layers.0.mixer.A_log: expected (8,)" in msg
    assert "unexpected (1)" in msg and "backbone.layers.0.mixer.surprise (3,)" in msg
    assert "wrong shape (1)" in msg and "experts.1.up_proj.weight: expected (32, 64), found (31, 64)" in msg


def test_missing_checkpoint_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Model.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(small_config().to_hf()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Model.from_pretrained(tmp_path)


@pytest.mark.parametrize("hf,field", [
    (dict(hybrid_override_pattern="M*E", num_hidden_layers=4), "num_hidden_layers"),
    (dict(hybrid_override_pattern="M*X"), "hybrid_override_pattern"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(mamba_num_heads=8, n_groups=3), "n_groups"),
    (dict(n_routed_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(moe_impl="cuda"), "moe_impl"),
    (dict(hybrid_override_pattern="M*E", layers_block_type=["moe", "mlp", "moe"]), "hybrid_override_pattern"),
])
def test_bad_config_names_the_field(hf, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig.from_hf(hf)


def test_config_round_trip_ignores_unused_hf_fields(tmp_path):
    cfg = small_config()
    d = cfg.to_hf() | dict(transformers_version="5.0", use_cache=True, moe_impl="torch")
    assert ModelConfig.from_hf(d) == cfg
    # transformers 5 writes the pattern as a list of block types
    d2 = {k: v for k, v in d.items() if k != "hybrid_override_pattern"}
    d2["layers_block_type"] = ["linear_attention", "full_attention", "moe", "linear_attention", "mlp", "moe"]
    assert ModelConfig.from_hf(d2).hybrid_override_pattern == "M*EM-E"
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.from_json(bad)


def test_shipped_configs():
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    nano = ModelConfig.from_json(os.path.join(root, "nemotron3_nano_30b_a3b.json"))
    with torch.device("meta"):
        counts = Model(nano).num_params()
    assert round(counts["total"] / 1e9, 1) == 31.6 and round(counts["active"] / 1e9, 1) == 3.6
    tiny = ModelConfig.from_json(os.path.join(root, "tiny_model.json"))
    assert set(tiny.hybrid_override_pattern) >= {"M", "*", "E"} and tiny.num_experts_per_tok > 1
    assert 1e6 < Model(tiny).num_params()["total"] < 1e7
