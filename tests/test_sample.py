"""The sampler against plain full forwards (no cache): greedy chains, log-probs, group sampling from one prefill,
the top-k / top-p support, stop tokens and lengths, seeding, streaming; and the CLI on a tiny exported checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

from model import Model
from sample import Completion, _length_buckets, generate, sample_tokens, sampling_logprobs
from tests.conftest import small_config
from tests.test_model import randomize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 17, 33], list(range(40, 61)), [9], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80]]  # 3, 21, 1, 11
# lengths 9, 12, 4, 10, 5: prefilled in two length buckets, (12, 10, 9) and (5, 4), left-padded within each
RAGGED = [list(range(3, 12)), list(range(20, 32)), [7, 8, 9, 10], list(range(40, 50)), [60, 61, 62, 63, 64]]


@pytest.fixture(scope="module")
def model():
    # every layer kind (M, *, E, -); chunk_size 8 so the 21-token prompt spans three scan chunks
    return randomize(Model(small_config())).eval()


@torch.no_grad()
def greedy_reference(model, prompt, steps):
    """The argmax chain of repeated full forwards over the growing sequence, one prompt alone, no cache."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def full_logits(model, prompt, tokens):
    """Logits [len(tokens), V] that predicted each of `tokens`, from one full forward without a cache."""
    seq = torch.tensor([list(prompt) + list(tokens)])
    return model(seq)[0, len(prompt) - 1:-1].float()


def test_greedy_equals_full_forward_argmax_chain(model):
    out = generate(model, PROMPTS, 12, temperature=0, stop_token_ids=[])
    assert len(out) == len(PROMPTS) and all(isinstance(c, Completion) for c in out)
    for prompt, c in zip(PROMPTS, out):
        assert c.tokens == greedy_reference(model, prompt, 12)
        assert c.finish_reason == "length" and c.logprobs == [0.0] * 12     # greedy: a point mass


def test_logprobs_are_the_models_log_softmax_and_groups_are_laid_out_by_prompt(model):
    n = 3
    out = generate(model, PROMPTS, 8, temperature=1.0, n=n, stop_token_ids=[], seed=0, raw_logprobs=True)
    assert len(out) == len(PROMPTS) * n
    for i, prompt in enumerate(PROMPTS):
        for j in range(n):
            c = out[i * n + j]                                           # completion j of prompt i
            ref = full_logits(model, prompt, c.tokens).log_softmax(-1)
            ref = ref.gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(c.raw_logprobs), ref, atol=1e-4, rtol=0)


def test_logprobs_are_those_of_the_tempered_truncated_distribution(model):
    """logprobs = the distribution actually sampled from (MOPD's pi_sampler); raw_logprobs = the plain model's."""
    kw = dict(temperature=0.7, top_p=0.9, top_k=20)
    out = generate(model, PROMPTS, 8, n=2, stop_token_ids=[], seed=1, raw_logprobs=True, **kw)
    for i, prompt in enumerate(PROMPTS):
        for c in out[2 * i:2 * i + 2]:
            logits = full_logits(model, prompt, c.tokens)
            idx = torch.tensor(c.tokens)[:, None]
            sampler = sampling_logprobs(logits, **kw).gather(-1, idx).squeeze(-1)
            raw = logits.log_softmax(-1).gather(-1, idx).squeeze(-1)
            assert torch.isfinite(sampler).all()                         # every sampled token was allowed
            torch.testing.assert_close(torch.tensor(c.logprobs), sampler, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(c.raw_logprobs), raw, atol=1e-4, rtol=0)
            assert (sampler > raw).all()                                 # truncation + T < 1 sharpen


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, PROMPTS, 10, n=2, seed=123, stop_token_ids=[])
    b = generate(model, PROMPTS, 10, n=2, seed=123, stop_token_ids=[])
    c = generate(model, PROMPTS, 10, n=2, seed=124, stop_token_ids=[])
    assert a == b
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_group_sampling_shares_one_prefill(model):
    calls = []
    hook = model.backbone.embeddings.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    try:
        n = 4
        out = generate(model, PROMPTS, 6, n=n, seed=0, stop_token_ids=[])
    finally:
        hook.remove()
    steps = 6 - 1                                                        # the last token is never fed back
    prefills, decode = calls[:-steps], calls[-steps:]
    assert prefills == [(1, 21), (1, 11), (1, 3), (1, 1)]                # one row per prompt (length buckets)
    assert all(shape == (len(PROMPTS) * n, 1) for shape in decode)       # then steps over all n*P rows
    for i in range(len(PROMPTS)):
        group = [tuple(c.tokens) for c in out[i * n:(i + 1) * n]]
        assert len(set(group)) == n, f"prompt {i}: the {n} samples are not distinct"


def test_length_buckets_prefill_each_prompt_once_and_match_each_prompt_alone(model):
    prompts = RAGGED
    assert _length_buckets([12, 10, 9, 5, 4]) == [slice(0, 3), slice(3, 5)]
    assert _length_buckets([4, 3, 2, 2, 1]) == [slice(0, 2), slice(2, 4), slice(4, 5)]   # 3 >= 0.75 * 4
    calls = []
    hook = model.backbone.embeddings.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    try:
        greedy = generate(model, prompts, 8, temperature=0, stop_token_ids=[])
    finally:
        hook.remove()
    assert calls[:2] == [(3, 12), (2, 5)]                                # 56 tokens computed, not 5 x 12 = 60
    for prompt, c in zip(prompts, greedy):
        assert c.tokens == greedy_reference(model, prompt, 8)
    for i, c in enumerate(generate(model, prompts, 6, n=2, seed=0, stop_token_ids=[])):
        prompt = prompts[i // 2]
        ref = full_logits(model, prompt, c.tokens).log_softmax(-1).gather(-1, torch.tensor(c.tokens)[:, None])
        torch.testing.assert_close(torch.tensor(c.logprobs), ref.squeeze(-1), atol=1e-4, rtol=0)


def test_top_k_one_is_greedy(model):
    greedy = generate(model, PROMPTS, 10, temperature=0, stop_token_ids=[])
    topk1 = generate(model, PROMPTS, 10, temperature=1.3, top_k=1, seed=5, stop_token_ids=[])
    assert [c.tokens for c in topk1] == [c.tokens for c in greedy]


def test_sampler_support_and_frequencies_on_fixed_logits():
    """A fixed-logit 'model': probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 over six tokens."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = p.log().repeat(20000, 1)
    g = torch.Generator().manual_seed(0)

    def freq(**kw):
        tokens, logprobs, _ = sample_tokens(logits, generator=g, **kw)
        return torch.bincount(tokens, minlength=6).float() / len(tokens), tokens, logprobs

    f, _, _ = freq()
    torch.testing.assert_close(f, p, atol=0.015, rtol=0)
    f, tokens, logprobs = freq(top_k=3)                                  # support {0, 1, 2}, renormalised
    assert set(tokens.tolist()) == {0, 1, 2}
    torch.testing.assert_close(f[:3], p[:3] / p[:3].sum(), atol=0.015, rtol=0)
    torch.testing.assert_close(logprobs, (p / p[:3].sum()).log()[tokens])
    f, tokens, _ = freq(top_p=0.6)            # mass before token 1 is 0.4 < 0.6, before token 2 is 0.65: {0, 1}
    assert set(tokens.tolist()) == {0, 1}
    torch.testing.assert_close(f[:2], p[:2] / p[:2].sum(), atol=0.015, rtol=0)
    f, tokens, _ = freq(top_p=0.3)                                       # the top token always stays
    assert set(tokens.tolist()) == {0}
    f, tokens, _ = freq(temperature=0.5)                                 # p^2, renormalised
    torch.testing.assert_close(f, p.square() / p.square().sum(), atol=0.015, rtol=0)


def test_top_k_and_top_p_restrict_the_support_of_the_model(model):
    n = 300
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]]))[0, -1].float()
    order = logits.argsort(descending=True)
    topk_allowed = set(order[:5].tolist())
    probs = logits.softmax(-1)[order]
    keep = int(((probs.cumsum(0) - probs) < 0.3).sum())                  # the nucleus of mass 0.3
    topp_allowed = set(order[:keep].tolist())
    assert 1 < keep < 50
    got_k = {c.tokens[0] for c in generate(model, [PROMPTS[0]], 1, top_k=5, n=n, seed=0, stop_token_ids=[])}
    got_p = {c.tokens[0] for c in generate(model, [PROMPTS[0]], 1, top_p=0.3, n=n, seed=0, stop_token_ids=[])}
    got_all = {c.tokens[0] for c in generate(model, [PROMPTS[0]], 1, n=n, seed=0, stop_token_ids=[])}
    assert got_k == topk_allowed                     # near-uniform logits at init: all 5 show up in 300 draws
    assert got_p <= topp_allowed and len(got_p) > 1
    assert len(got_all - topp_allowed) > 0           # the unrestricted sampler does go outside them


def test_stop_tokens_end_rows_independently(model):
    steps = 12
    refs = [greedy_reference(model, p, steps) for p in PROMPTS]
    # a stop token that row 0 samples at step 2; the other rows stop at its first occurrence (if any) or run on
    stop = refs[0][2]
    out = generate(model, PROMPTS, steps, temperature=0, stop_token_ids=[stop])
    for ref, c in zip(refs, out):
        if stop in ref:
            k = ref.index(stop) + 1
            assert c.tokens == ref[:k] and c.finish_reason == "stop"
        else:
            assert c.tokens == ref and c.finish_reason == "length"
        assert len(c.logprobs) == len(c.tokens)
    assert len(out[0].tokens) == 3 and any(c.finish_reason == "length" or len(c.tokens) > 3 for c in out[1:]), \
        "pick prompts so that rows stop at different steps"
    # a second stop token ends another row earlier, while the first keeps its place
    stop2 = refs[1][0]
    out2 = generate(model, PROMPTS, steps, temperature=0, stop_token_ids=[stop, stop2])
    assert out2[1].tokens == [stop2] and out2[1].finish_reason == "stop"
    assert out2[0].tokens[-1] in (stop, stop2)


def test_default_stop_is_the_config_eos_and_length_finish(model):
    ref = greedy_reference(model, PROMPTS[0], 8)
    eos_model = randomize(Model(small_config(eos_token_id=ref[3]))).eval()     # same weights, other eos
    c = generate(eos_model, [PROMPTS[0]], 8, temperature=0)[0]
    assert c.tokens == ref[:ref.index(ref[3]) + 1] and c.finish_reason == "stop"
    c = generate(eos_model, [PROMPTS[0]], 8, temperature=0, stop_token_ids=())[0]   # empty: no stop token
    assert c.tokens == ref and c.finish_reason == "length"
    c = generate(model, [PROMPTS[0]], 5, temperature=0, stop_token_ids=[])[0]
    assert len(c.tokens) == 5 and c.finish_reason == "length"


def test_streaming_callback_sees_every_token(model):
    seen = {}
    out = generate(model, PROMPTS, 9, n=2, seed=3, stop_token_ids=[7, 11, 13, 17, 19, 23, 29, 31],
                   on_step=lambda idx, toks: [seen.setdefault(i, []).append(t) for i, t in zip(idx, toks)])
    assert {i: c.tokens for i, c in enumerate(out)} == seen


def test_bad_arguments():
    m = Model(small_config()).eval()
    with pytest.raises(ValueError, match="empty"):
        generate(m, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, [[1, 2]], 3, top_p=0)
    assert generate(m, [[1, 2]], 0, n=2) == [Completion([], [], "length")] * 2


# ----------------------------------------------------------------------------------------------------------------
# CLI and evaluate on a tiny exported checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tokenizer_mod = pytest.importorskip("tokenizer")
    texts = ["What is 2+2? The answer is \\boxed{4}.", "Write a haiku about the sea, all in lowercase.",
             "def add(a, b):\n    return a + b\n", "{\"name\": \"Ada\", \"age\": 36}"] * 20
    tok = tokenizer_mod.train_bpe(texts, vocab_size=300)
    d = tmp_path_factory.mktemp("ckpt") / "export"
    randomize(Model(small_config(vocab_size=300))).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_prompt_answers_once(ckpt):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(ckpt), "--prompt", "hi",
                        "--max-new-tokens", "6", "--device", "cpu", "--seed", "1"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("<think>\n")                 # not a tty: the thought is marked, not dimmed
    assert "finish: length" in r.stderr or "finish: stop" in r.stderr


def test_evaluate_and_eval_cli(ckpt, tmp_path):
    tasks = pytest.importorskip("tasks")
    if not hasattr(tasks, "score_responses"):
        pytest.skip("tasks.score_responses not there yet")
    import sample
    rows = [{"domain": "math", "messages": [{"role": "user", "content": f"What is {a}+{a}?"}], "answer": str(2 * a)}
            for a in range(3)]
    f = tmp_path / "eval.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.json"
    result = sample.main(["--ckpt", str(ckpt), "--eval", str(f), "--n", "2", "--out", str(out),
                          "--max-new-tokens", "4", "--device", "cpu"])
    assert json.loads(out.read_text())["generation"]["n"] == 2
    assert result["generation"]["truncated"] == 1.0          # 4 tokens of a random model never stop


def test_evaluate_maps_responses_back_to_their_examples(ckpt, monkeypatch):
    """evaluate sorts prompts by length and batches them; each response must still be graded against its own
    example. A fake generate answers every prompt correctly (thinking and non-thinking), so all must score 1."""
    import re
    from types import SimpleNamespace

    import sample
    from tokenizer import load_tokenizer
    tok = load_tokenizer(ckpt)
    stop = tok.stop_token_ids[-1]

    def fake_generate(model, prompts, max_new_tokens, n=1, **kw):
        outs = []
        for p in prompts:
            a = int(re.findall(r"What is (\d+)\+", tok.decode(p))[-1])
            text = f"{a}+{a} is {2 * a}.\n</think>\n\\boxed{{{2 * a}}}" if thinking else f"\\boxed{{{2 * a}}}"
            ids = tok.encode(text) + [stop]
            outs += [Completion(ids, [0.0] * len(ids), "stop") for _ in range(n)]
        return outs

    monkeypatch.setattr(sample, "generate", fake_generate)
    examples = [{"domain": "math", "messages": [{"role": "user", "content": f"What is {a}+{a}?"}], "answer": str(2 * a)}
                for a in (123456789, 7, 4242, 31)]
    for thinking in (True, False):
        no_model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))  # prompts are checked on it
        result = sample.evaluate(no_model, tok, examples, n=2, batch_size=3, thinking=thinking, return_responses=True)
        assert result["all"]["pass@1"] == 1.0 and result["all"]["avg@k"] == 1.0, result["responses"]
        assert result["responses"][1][0].startswith("<think>\n" if thinking else "<think></think>")
        assert "<|im_end|>" not in result["responses"][1][0]


def test_chunked_prefill_matches_one_prefill(model, capsys):
    """Long prompts are prefilled in pieces (left padding lands in the first pieces, some of them all padding)."""
    whole = generate(model, RAGGED, 6, temperature=1.0, seed=9, stop_token_ids=[], prefill_chunk=0, raw_logprobs=True)
    for chunk in (2, 7):                          # 2: the 9-token row's first piece in its bucket of 12 is all padding
        parts = generate(model, RAGGED, 6, temperature=1.0, seed=9, stop_token_ids=[], prefill_chunk=chunk,
                         raw_logprobs=True, progress=True)
        total = sum(map(len, RAGGED))             # a long prefill shows its progress, chunk by chunk
        assert f"prefill {total} tokens" in capsys.readouterr().err
        assert [c.tokens for c in parts] == [c.tokens for c in whole]
        for a, b in zip(parts, whole):
            torch.testing.assert_close(torch.tensor(a.raw_logprobs), torch.tensor(b.raw_logprobs), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# The fixed-slot decode loop against the plain (reference) one


def assert_same_completions(fast, ref):
    assert [c.tokens for c in fast] == [c.tokens for c in ref]
    assert [c.finish_reason for c in fast] == [c.finish_reason for c in ref]
    for a, b in zip(fast, ref):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(a.raw_logprobs), torch.tensor(b.raw_logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("static_shapes", [False, True])
def test_fast_decode_equals_reference_loop(model, static_shapes, monkeypatch):
    """Ragged prompts, n > 1, rows that finish at different steps (one with its first token), compaction (and,
    with static shapes, compaction to power-of-two buckets), greedy and seeded top-k / top-p sampling."""
    from model import InferenceCache
    batch_sizes = []                                      # the batch after each cache.select in the fast loop
    select = InferenceCache.select
    monkeypatch.setattr(InferenceCache, "select", lambda self, rows: (batch_sizes.append(len(rows)),
                                                                      select(self, rows))[1])
    chains = [c.tokens for c in generate(model, PROMPTS, 10, temperature=0, stop_token_ids=[], reference=True)]
    stops = [chains[1][0], chains[0][4], chains[3][7]]    # row 1 stops at once, rows 0 and 3 later
    kw = dict(stop_token_ids=stops, raw_logprobs=True)
    ref = generate(model, PROMPTS, 10, temperature=0, reference=True, **kw)
    assert ref[1].tokens == [stops[0]] and len({len(c.tokens) for c in ref}) >= 3, [c.tokens for c in ref]
    for check_every in (1, 3):
        batch_sizes.clear()
        fast = generate(model, PROMPTS, 10, temperature=0, static_shapes=static_shapes, check_every=check_every,
                        **kw)
        assert_same_completions(fast, ref)
        if check_every == 1:
            assert batch_sizes and batch_sizes[0] <= 2, batch_sizes         # compacted once half had finished
            assert not static_shapes or all(b & (b - 1) == 0 for b in batch_sizes), batch_sizes   # buckets
    sampling = dict(n=3, seed=4, temperature=0.8, top_p=0.9, top_k=30)
    ref = generate(model, PROMPTS, 12, reference=True, **sampling, **kw)
    assert sum(c.finish_reason == "stop" for c in ref) >= 2, "pick stops that some samples do sample"
    fast = generate(model, PROMPTS, 12, static_shapes=static_shapes, check_every=2, **sampling, **kw)
    assert_same_completions(fast, ref)


def test_decode_step_keeps_the_mamba_state_fp32_and_advances_the_cache_in_place():
    m = randomize(Model(small_config())).set_dtype(torch.bfloat16).eval()
    cache = m.new_cache(2, 8)
    with torch.inference_mode():
        m.hidden_states(torch.tensor([[5, 6, 7], [8, 9, 10]]), cache=cache)
        before = {(i, k): t for i, layer in enumerate(cache.layers) if layer for k, t in layer.items()}
        snapshot = {key: t.clone() for key, t in before.items()}
        m.hidden_states(torch.tensor([[11], [12]]), cache=cache)
    assert cache.pos == 4 and cache.pos_t.item() == 4 and cache.valid[:, :4].all() and not cache.valid[:, 4:].any()
    for (i, k), t in before.items():
        assert cache.layers[i][k] is t, f"layer {i} {k}: replaced, not updated in place"
        assert not torch.equal(t, snapshot[(i, k)]), f"layer {i} {k}: did not advance"
        assert t.dtype == (torch.float32 if k == "ssm" else torch.bfloat16), (i, k, t.dtype)


def test_fast_decode_reads_the_device_once_every_check_every_steps():
    """Host syncs (item / bool / nonzero) of a whole generate call: one per check_every steps in the fixed-slot
    loop, one per step in the reference loop. No MoE layer: the CPU grouped matmul syncs inside itself."""
    from torch.utils._python_dispatch import TorchDispatchMode
    m = randomize(Model(small_config(hybrid_override_pattern="M*M-"))).eval()
    aten = torch.ops.aten
    sync_ops = (aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default, aten.nonzero.default)

    class CountSyncs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in sync_ops
            return func(*args, **(kwargs or {}))

    def syncs(steps, **kw):
        with CountSyncs() as counter:
            generate(m, PROMPTS, steps, temperature=0, stop_token_ids=[m.config.vocab_size - 1], **kw)
        return counter.n

    assert syncs(17, check_every=4) - syncs(9, check_every=4) == 2          # checks after steps 12 and 16
    assert syncs(17, reference=True) - syncs(9, reference=True) >= 8


def test_static_shape_decode_steps_are_identical_kernel_sequences(model):
    """What CUDA-graph replay needs (no GPU here to capture one): with a static-shape cache, every decode step
    calls the same aten ops on tensors of the same shapes, with no host sync among them; the device position
    moves on by itself. Without static shapes, the attended length grows each step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sample import _last_logits

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shapes = [tuple(a.shape) for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)]
            self.ops.append((str(func), tuple(shapes)))
            return func(*args, **(kwargs or {}))

    def step_traces(static_shapes):
        cache = model.new_cache(3, 12, static_shapes=static_shapes)
        tokens = torch.tensor([4, 5, 6])
        traces = []
        with torch.inference_mode():
            _last_logits(model, torch.tensor([[1, 2], [3, 4], [5, 6]]), cache=cache)
            for _ in range(3):
                with Trace() as trace:
                    trace.ops = []
                    tokens = _last_logits(model, tokens[:, None], cache=cache).argmax(-1)
                traces.append(trace.ops)
        return traces, cache

    traces, cache = step_traces(static_shapes=True)
    assert traces[0] == traces[1] == traces[2]
    assert not [op for op, _ in traces[0] if "local_scalar_dense" in op or "nonzero" in op or ".item" in op]
    assert cache.pos_t.item() == cache.pos == 5 and cache.valid[:, :5].all() and not cache.valid[:, 5:].any()
    traces, _ = step_traces(static_shapes=False)
    assert traces[0] != traces[1]


# ----------------------------------------------------------------------------------------------------------------
# Sampling from the model that trains: FSDP2 (gloo, 1 and 2 processes, fp32 and bf16 mixed precision)


def _train_step(model, ids, opt):
    """One SGD step on the mean token NLL; returns (loss, gradient norm) as floats, the same on every rank."""
    from torch.distributed.tensor import DTensor
    loss = -model(ids[:, :-1], targets=ids[:, 1:]).mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    opt.step()
    opt.zero_grad()
    return loss.item(), norm.item()


def _fsdp_worker(rank, world, port, errors):
    import copy

    import torch.distributed as dist
    from torch.nn import Parameter

    import common
    from sample import sampling_weights
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    d = common.init_dist("cpu")
    try:
        ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(rank))   # per-rank data
        kw = dict(stop_token_ids=[], raw_logprobs=True)
        for bf16 in (False, True):
            base = randomize(Model(small_config()))
            sharded, untouched, probe = (common.shard_model(copy.deepcopy(base), d, bf16=bf16) for _ in range(3))
            # the plain model computes with what FSDP's forward computes with: each parameter in the dtype it is
            # gathered in (read off a real forward of the probe), buffers as they are
            dtypes = {}
            for prefix, m in probe.named_modules():
                m.register_forward_pre_hook(lambda m, args, prefix=prefix: dtypes.update(
                    {f"{prefix}.{n}".lstrip("."): p.dtype for n, p in m.named_parameters() if type(p) is Parameter}))
            with torch.no_grad():
                probe(ids)
            plain = copy.deepcopy(base)
            for name, p in plain.named_parameters():
                p.data = p.data.to(dtypes[name])                 # (KeyError: a parameter FSDP never gathered)
            assert (torch.bfloat16 in dtypes.values()) == bf16
            opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (sharded, untouched)]
            for phase in range(2):                  # before the first training forward, then after a step
                with sampling_weights(sharded) as gathered:       # in the plain model's layout (Experts transposed)
                    assert [p.stride() for p in gathered.parameters()] == [p.stride() for p in plain.parameters()]
                    greedy = generate(sharded, PROMPTS, 6, temperature=0, **kw)
                    sampled = generate(sharded, PROMPTS, 6, n=2, seed=rank, top_p=0.9, **kw)
                assert greedy == generate(plain, PROMPTS, 6, temperature=0, **kw), (bf16, phase)
                assert sampled == generate(plain, PROMPTS, 6, n=2, seed=rank, top_p=0.9, **kw), (bf16, phase)
                if phase == 0:                                       # outside the block: gathers for itself
                    assert generate(sharded, PROMPTS, 6, temperature=0, **kw) == greedy
                a, b = _train_step(sharded, ids, opts[0]), _train_step(untouched, ids, opts[1])
                assert a == b, (bf16, phase, a, b)                   # the same loss and gradient norm, exactly
                full = {k: v.full_tensor() for k, v in sharded.state_dict().items() if hasattr(v, "full_tensor")}
                for name, p in plain.named_parameters():             # follow the training step on the plain copy
                    p.data.copy_(full[name])                         # (in its own layout: Experts are transposed)
    except BaseException as e:                                       # reported to the parent, which fails the test
        import traceback
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # every check passed: leave without the interpreter's teardown, where gloo's threads can abort a finished
    # worker (SIGABRT, "terminate called without an active exception"; seen once in a full run on 2 cores)
    os._exit(0)


@pytest.mark.parametrize("world", [1, 2])
def test_generate_on_fsdp_model_equals_plain_model_and_leaves_training_alone(world):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = mp.get_context("spawn").SimpleQueue()
    procs = mp.start_processes(_fsdp_worker, args=(world, port, errors), nprocs=world, join=False,
                               start_method="spawn")
    try:
        while not procs.join(timeout=300):
            pass
    except Exception as e:                      # a worker failed: show its traceback, not just its exit code
        raise AssertionError(errors.get() if not errors.empty() else str(e)) from None
