"""Multi-turn episodes (sample.generate_episodes): the caches carried across turns against full forwards of the
concatenated history, replies appended as context, budgets, seeding; the reply tokens against the chat template;
and the loss masks that keep environment tokens out of the GRPO and MOPD losses."""
import pytest
import torch

import common
from distill import mopd_loss
from model import Model
from rl import grpo_loss
from sample import Completion, generate_episodes
from tests.conftest import small_config
from tests.test_model import randomize

PROMPTS = [list(range(3, 12)), [7, 8, 9, 10], list(range(20, 33))]
STOP = 5                                   # the turn's stop token (a tiny model samples it now and then)


@pytest.fixture(scope="module")
def model():
    return randomize(Model(small_config())).eval()


def replies_by_rule(reply_len, turns_before_done):
    """respond(): every finished turn gets a reply of reply_len(episode, turn) tokens (ids from the turn's own
    tokens, so a reply depends on what was sampled), until the episode has had turns_before_done turns."""
    count = {}

    def respond(episodes, turns):
        out = []
        for e, t in zip(episodes, turns):
            count[e] = count.get(e, 0) + 1
            if count[e] >= turns_before_done:
                out.append(None)
            else:
                out.append([(t[0] + 7 * k) % 90 + 10 for k in range(reply_len(e, count[e]))])
        return out
    return respond, count


def greedy_ids(model, prompt, seq_mask, tokens):
    """Argmax of one full forward (no cache) over prompt + tokens at each policy token's position."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(tokens)]))[0, len(prompt) - 1:-1]
    return [int(i) for i, m in zip(logits.argmax(-1), seq_mask) if m]


@pytest.mark.parametrize("check_every", [8, 1])
def test_cached_turns_equal_a_full_forward_of_the_history(model, check_every):
    # greedy; a turn stops at a stop id or after 6 tokens; replies of different lengths per episode (the left
    # padding of the reply prefill differs by row); three turns, so the cache is continued twice. check_every 1:
    # stopped rows are parked (copied out of the batch) mid-turn and gathered back for the next turn
    stop = list(range(0, 101, 3))          # a third of the vocabulary stops a turn: turns of different lengths
    respond, count = replies_by_rule(lambda e, t: 1 + (3 * e + t) % 5, turns_before_done=3)
    prompts = PROMPTS + [list(range(40, 47)), [90, 91]]
    out = generate_episodes(model, prompts, 6, respond, max_turns=3, max_tokens=200, temperature=0,
                            stop_token_ids=stop, check_every=check_every)
    assert len(out) == len(prompts)
    saw_ragged = set()
    for prompt, c in zip(prompts, out):
        assert len(c.tokens) == len(c.mask) == len(c.logprobs)
        policy = [t for t, m in zip(c.tokens, c.mask) if m]
        assert greedy_ids(model, prompt, c.mask, c.tokens) == policy
        if c.finish_reason == "stop":
            assert c.turns == 3
        saw_ragged.add(sum(1 for m in c.mask if m))
    assert len(saw_ragged) > 1, "turns of equal length everywhere: the test would not see frozen rows"


def test_sampled_episode_logprobs_equal_a_full_forward_and_replies_carry_none(model):
    respond, _ = replies_by_rule(lambda e, t: 2 + e % 3, turns_before_done=2)
    out = generate_episodes(model, PROMPTS, 5, respond, n=2, max_turns=2, max_tokens=100, temperature=1.0,
                            stop_token_ids=list(range(0, 101, 4)), seed=3, raw_logprobs=True)
    assert len(out) == 2 * len(PROMPTS)
    for i, c in enumerate(out):
        prompt = PROMPTS[i // 2]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.tokens]))[0, len(prompt) - 1:-1].float()
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
        m = torch.tensor(c.mask, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(c.raw_logprobs)[m], ref[m], atol=2e-5, rtol=0)
        assert all(lp == 0.0 for lp, k in zip(c.raw_logprobs, c.mask) if not k)


def test_seeded_episodes_repeat_and_do_not_depend_on_their_batch(model):
    respond = lambda: replies_by_rule(lambda e, t: 3, turns_before_done=2)[0]
    kw = dict(max_turns=2, max_tokens=100, temperature=1.0, stop_token_ids=list(range(0, 101, 4)), seed=11)
    a = generate_episodes(model, PROMPTS, 5, respond(), **kw)
    b = generate_episodes(model, PROMPTS, 5, respond(), **kw)
    assert [c.tokens for c in a] == [c.tokens for c in b]


def test_budgets_end_episodes_as_length(model):
    # a reply that never ends the episode: it runs into max_turns, or into max_tokens
    forever = lambda episodes, turns: [[50, 51] for _ in episodes]
    out = generate_episodes(model, PROMPTS, 4, forever, max_turns=3, max_tokens=1000, temperature=0,
                            stop_token_ids=list(range(101)))          # every token stops: 1-token turns
    assert all(c.finish_reason == "length" and c.turns == 3 for c in out)
    assert all(c.mask == [1, 0, 0, 1, 0, 0, 1] for c in out)
    out = generate_episodes(model, PROMPTS, 4, forever, max_turns=10, max_tokens=5, temperature=0,
                            stop_token_ids=list(range(101)))
    assert all(c.finish_reason == "length" and len(c.tokens) <= 5 for c in out)


def test_loss_masks_keep_environment_tokens_out_of_the_gradients(model):
    """GRPO's and MOPD's losses over one episode: the gradient equals that of the policy tokens alone, whatever
    the environment's tokens are (changing them changes the context, so both runs use the same tokens; the
    check is that zeroing the mask's env positions changes nothing, and that env tokens count for no n_tokens)."""
    prompt = [3, 4, 5, 6]
    c = Completion(tokens=[10, 11, 12, 40, 41, 42, 43, 13, 14], logprobs=[-1.0] * 9, finish_reason="stop",
                   raw_logprobs=[-1.0] * 9, mask=[1, 1, 1, 0, 0, 0, 0, 1, 1], turns=2)
    full = Completion(c.tokens, c.logprobs, "stop", c.raw_logprobs, mask=[1] * 9)
    lp, mask = common.rollout_logprobs(model, [prompt], [c], torch.device("cpu"))
    assert mask[0].tolist() == [bool(m) for m in c.mask]
    assert (lp[0][~mask[0]] == 0).all()
    lp_full, _ = common.rollout_logprobs(model, [prompt], [full], torch.device("cpu"))
    torch.testing.assert_close(lp[mask], lp_full[0][mask[0]])
    # the GRPO loss and its gradient: only the 5 policy tokens
    model.zero_grad()
    grpo_loss(lp, torch.tensor([1.5]), mask, n_tokens=5).backward()
    g_masked = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    lp2, _ = common.rollout_logprobs(model, [prompt], [full], torch.device("cpu"))
    keep = torch.tensor([c.mask], dtype=torch.bool)
    grpo_loss(lp2 * keep, torch.tensor([1.5]), keep, n_tokens=5).backward()
    g_ref = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(g_masked, g_ref):
        torch.testing.assert_close(a, b)
    # MOPD: teacher log-probs on env tokens do not matter
    teacher = torch.randn(1, 9)
    sampler = torch.full((1, 9), -1.0)
    loss_a = mopd_loss(lp.detach(), teacher, sampler, mask, 1)[0]
    teacher[0, 3:7] = 100.0
    loss_b = mopd_loss(lp.detach(), teacher, sampler, mask, 1)[0]
    torch.testing.assert_close(loss_a, loss_b)


def test_episode_token_stream_equals_the_chat_template_rendering():
    """A shipped agent episode, rebuilt as a rollout builds it (the prompt's ids, each turn's tokens ending in
    <|im_end|>, each reply's encode_reply ids), is token for token encode_chat of the whole conversation: the
    policy sees in its cache exactly what the template (and so SFT, vLLM or transformers) gives it."""
    import json
    import os

    from tokenizer import encode_chat, encode_prompt, encode_reply, load_tokenizer, render_chat
    tok = load_tokenizer()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = [json.loads(line) for line in open(os.path.join(root, "data", "sft.jsonl"))]
    episodes = [r for dom in ("agent", "swe") for r in [r for r in rows if r["domain"] == dom
                and sum(m["role"] == "assistant" for m in r["messages"]) >= 2][:3]]
    assert len(episodes) == 6                               # three of each domain, each with a reply between turns
    im_end = tok.token_id("<|im_end|>")
    for row in episodes:
        messages, tools = row["messages"], row.get("tools")
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        stream = encode_prompt(tok, messages[:first], tools=tools)
        i = first
        while i < len(messages):
            # the turn as the model writes it after the generation prompt: the template's text, <|im_end|> sampled
            full = render_chat(messages[:i + 1], tools=tools)
            before = render_chat(messages[:i], tools=tools, add_generation_prompt=True)
            stream += tok.encode(full[len(before):].removesuffix("<|im_end|>\n")) + [im_end]
            j = i + 1
            while j < len(messages) and messages[j]["role"] == "tool":
                j += 1
            if j > i + 1:
                stream += encode_reply(tok, messages[i + 1:j])
            i = j
        assert stream == encode_chat(tok, messages, tools=tools)[0][:len(stream)]
        assert len(stream) == len(encode_chat(tok, messages, tools=tools)[0]) - 1     # all but the final "\n"
    with pytest.raises(ValueError, match="'tool' messages"):
        encode_reply(tok, [{"role": "user", "content": "more"}])
