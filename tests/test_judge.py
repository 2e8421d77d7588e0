"""judge.py and the RLHF stage: verdict parsing, rewards from verdicts in both orders, the in-process judge (a tiny
model trained here) and the endpoint judge (a real HTTP server on a socket), timeouts and bad input, the chat
domain's hidden criteria and the shipped judgement data, and an RLHF stage that resumes after SIGKILL with
identical rewards."""
import http.server
import json
import os
import random
import re
import socket
import sys
import threading
import warnings

import pytest
import torch

import common
import judge
import options
import rl
import tasks
from model import Model
from tests.test_rl import ROOT, run_killing_group, run_torchrun, tiny_config, toy_export
from tokenizer import encode_chat, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_ROW = {"domain": "chat", "messages": [{"role": "user", "content": "Give Ana a short list about cats."}],
            "topic": ["cats", "my cat", "a small cat"], "format": "list"}
PROSE_ROW = dict(CHAT_ROW, messages=[{"role": "user", "content": "Tell Ana about cats."}], format="prose")


# -- the verdict ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, thinking, verdict", [
    ("[[A]]", False, "A"),
    ("<think>\nA is on topic.\n</think>\n[[B]]", None, "B"),
    ("<think></think>The answers are equal. [[C]]", None, "C"),
    ("[[ b ]]", False, "B"),                                         # spaces and case
    ("I first thought [[A]], but [[B]] is better.", False, "B"),    # the last verdict counts
    ("<think>\n[[A]] looks right\n</think>\nI cannot tell.", None, None),   # a verdict in the thought only
    ("<think>\nthinking about [[A]]", None, None),                  # the thought never closes
    ("[A]", False, None), ("A is better", False, None), ("[[D]]", False, None), ("", False, None),
    (None, None, None),                                              # no judgement came back
])
def test_parse_verdict(text, thinking, verdict):
    assert judge.parse_verdict(text, thinking) == verdict


def test_group_rewards_by_hand():
    # 0 beats 1 in both orders; 0 vs 2: A-position bias (each wins as A) = a tie; 1 vs 2: 2 wins once, the other
    # order is unparsable (a tie): s_12 = (0 + 0.5) / 2; rollout 3 is cut off: never judged, scores 0, loses
    ok = [True, True, True, False]
    verdicts = {(0, 1): "A", (1, 0): "B", (0, 2): "A", (2, 0): "A", (1, 2): "B", (2, 1): None}
    rewards, s = judge.group_rewards(ok, verdicts)
    assert s == {(0, 1): 1.0, (0, 2): 0.5, (1, 2): 0.25}
    assert rewards == pytest.approx([(1 + 0.5 + 1) / 3, (0 + 0.25 + 1) / 3, (0.5 + 0.75 + 1) / 3, 0.0])
    # ties everywhere: every judged rollout 1/2 against the others, 1 against a cut-off one
    rewards, _ = judge.group_rewards([True, True, False], {(0, 1): "C", (1, 0): "C"})
    assert rewards == [0.75, 0.75, 0.0]
    assert judge.group_rewards([False, False], {})[0] == [0.0, 0.0]


def test_a_ring_of_opponents_bounds_the_judgements():
    assert judge.opponent_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert judge.opponent_pairs(6, 1) == [(0, 1), (0, 5), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert judge.opponent_pairs(5, 2) == judge.opponent_pairs(5)      # 2 x 2 opponents: everyone already
    # the lower index always wins: on a ring of 4 each rollout meets two, and 0 and 3 meet across the end
    scripted = ScriptedJudge(lambda a, b: "[[A]]" if a < b else "[[B]]")
    rewards, counts = judge.score_groups(scripted, [CHAT_ROW["messages"]], ["0", "1", "2", "3"], [True] * 4, 4,
                                         thinking=False, opponents=1, judge_format="pairwise")
    assert rewards == [1.0, 0.5, 0.5, 0.0] and counts["judgements"] == len(scripted.asked) == 8


class ScriptedJudge:
    """complete() answers each judgement by a rule on its answer (a rating conversation) or its two answers (a
    pairwise one); records what it was asked."""
    thinking = None

    def __init__(self, rule):
        self.rule, self.asked = rule, []

    def complete(self, conversations):
        self.asked += conversations
        return [self.rule(*answers(c)) if "\n\n[A]\n" in c[0]["content"] else self.rule(rated_answer(c))
                for c in conversations]



def answers(conversation):
    """The A and B answers of a judge_messages conversation."""
    text = conversation[0]["content"]
    return text.split("\n\n[A]\n")[1].split("\n\n[B]\n")


def test_score_groups_asks_both_orders_skips_cut_off_rollouts_and_counts():
    # groups of 3: "good" beats "bad"; "odd" gets an unparsable judgement; the third rollout of group 1 is cut off
    rule = lambda a, b: "<think>\n</think>\n" + ("garbled" if "odd" in a + b else
                                                 "[[C]]" if a == b else "[[A]]" if a == "good" else "[[B]]")
    scripted = ScriptedJudge(rule)
    texts = ["<think>\n</think>\ngood", "<think>\n</think>\nbad", "<think>\n</think>\nbad",
             "<think>\n</think>\nodd", "<think>\n</think>\ngood", "<think>\nnever closed"]
    finished = [True, True, True, True, True, False]
    hidden = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    prompts = [CHAT_ROW["messages"], PROSE_ROW["messages"]]
    rewards, counts = judge.score_groups(scripted, prompts, texts, finished, 3, hidden=hidden, judge_format="pairwise")
    # group 0: good beats both bads; bad vs bad is a tie. group 1: odd vs good unparsable both ways (a tie),
    # rollout 2 never judged (cut off)
    assert rewards == [1.0, 0.25, 0.25, 0.75, 0.75, 0.0]
    assert len(scripted.asked) == 6 + 2 == counts["judgements"]
    asked = {tuple(answers(c)) for c in scripted.asked}
    assert ("good", "bad") in asked and ("bad", "good") in asked            # both orders
    assert all("never closed" not in a + b for a, b in asked)              # the cut-off rollout is not shown
    assert scripted.asked[0][0]["content"].startswith(judge.INSTRUCTION) and "[User]\nGive Ana" in \
        scripted.asked[0][0]["content"]
    assert counts == dict(judgements=8, ties=2, unparsable=2, pairs=4, consistent=3, decided=3, agreed=2)


@pytest.mark.parametrize("text, thinking, rating", [
    ("[[3]]", False, 3),
    ("<think>\nTopic yes, format no. Score 2.\n</think>\n[[2]]", None, 2),
    ("[[ 0 ]]", False, 0),
    ("[[1]] at first, then [[2]]", False, 2),                       # the last rating counts
    ("<think>\n[[3]]\n</think>\nno rating", None, None),            # a rating in the thought only
    ("[[4]]", False, None), ("[[A]]", False, None), ("[[-1]]", False, None), ("Score 3.", False, None),
    ("<think>\nnever closed [[3]]", None, None), (None, None, None),
])
def test_parse_rating(text, thinking, rating):
    assert judge.parse_rating(text, thinking) == rating


def test_rating_rewards_by_hand():
    # ratings 3 and 0; an unparsable rating takes the mean of the others (the cut-off one's 0 included): its
    # advantage is 0; the cut-off rollout scores 0
    rewards = judge.rating_rewards([True, True, True, False], [3, 0, None, None])
    assert rewards == pytest.approx([1.0, 0.0, 1 / 3, 0.0])
    assert sum(rewards) / 4 == pytest.approx(rewards[2])
    assert judge.rating_rewards([True, True], [None, None]) == [0.5, 0.5]          # nothing known: all equal
    assert judge.rating_rewards([False, False], [None, None]) == [0.0, 0.0]


def rated_answer(conversation):
    """The answer of a rating_messages conversation."""
    return conversation[0]["content"].split("\n\n[Answer]\n")[1]


def test_score_groups_rates_each_judged_rollout_once_and_counts():
    # groups of 3; the rating is the answer's length in words (3 at most); "odd" gets no rating; group 1's third
    # rollout is cut off
    rule = lambda a: "<think>\n</think>\n" + ("garbled" if a == "odd" else f"[[{min(len(a.split()), 3)}]]")
    scripted = ScriptedJudge(rule)
    texts = ["<think>\n</think>\nfour words said here", "<think>\n</think>\none", "<think>\n</think>\ntwo words",
             "<think>\n</think>\nodd", "<think>\n</think>\nall three words", "<think>\nnever closed"]
    finished = [True, True, True, True, True, False]
    hidden = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    prompts = [CHAT_ROW["messages"], PROSE_ROW["messages"]]
    rewards, counts = judge.score_groups(scripted, prompts, texts, finished, 3, hidden=hidden)
    assert rewards == pytest.approx([1.0, 1 / 3, 2 / 3, 0.5, 1.0, 0.0])           # odd: the mean of 1 and 0
    assert [rated_answer(c) for c in scripted.asked] == ["four words said here", "one", "two words", "odd",
                                                         "all three words"]      # once each; the cut-off one never
    assert scripted.asked[0][0]["content"].startswith(judge.RATING_INSTRUCTION)
    assert "[User]\nGive Ana" in scripted.asked[0][0]["content"]
    # the decided pairs: (0, 1) and (1, 2) in group 0 ranked right; (3, 4) in group 1 ranked right (0.5 < 1)
    assert counts == dict(judgements=5, ties=0, unparsable=1, pairs=0, consistent=0, decided=3, agreed=3)
    with pytest.raises(judge.JudgeError, match="judge_format 'score'"):
        judge.score_groups(scripted, prompts, texts, finished, 3, judge_format="score")


def test_agreement_on_held_out_pairs_in_both_formats():
    pairs = [dict(CHAT_ROW, responses=["- Cats purr.\n- My cat naps.", "Dogs bark."], better="A"),
             dict(PROSE_ROW, responses=["- Cats purr.\n- Cats nap.", "Cats purr. Cats nap."], better="B"),
             dict(PROSE_ROW, responses=["Birds sing.", "Rain falls."], better="C")]
    truth = {a: tasks.chat.score(p, a) for p in pairs for a in p["responses"]}
    rater = ScriptedJudge(lambda a: f"[[{truth[a]}]]" if a != "Rain falls." else "no rating")
    got = judge.agreement(rater, pairs, "rating")
    assert got == dict(pairs=3, pair_agreement=1.0, verdict_accuracy=5 / 6, unparsable=1 / 6)
    assert len(rater.asked) == 6
    first = ScriptedJudge(lambda a, b: "[[A]]")                      # a pure position bias: every pair a tie
    got = judge.agreement(first, pairs, "pairwise")
    assert got == dict(pairs=3, pair_agreement=0.0, verdict_accuracy=1 / 3, consistent=0.0, unparsable=0.0)
    assert len(first.asked) == 6


# -- the in-process judge: a tiny model trained here to write "[[A]]" ------------------------------------------------


@pytest.fixture(scope="module")
def toy_judge(tmp_path_factory):
    """A tiny model trained (a few seconds) to answer any judge prompt with "[[A]]" in non-thinking mode: a judge
    with a pure position bias, whose verdicts asked in both orders cancel into ties."""
    path = tmp_path_factory.mktemp("judge") / "judge"
    tok = load_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                # a module fixture: set up before the tests' one_thread fixture
    torch.manual_seed(0)
    model = Model(tiny_config())
    rng = random.Random(0)
    docs = []
    for k in range(4):
        a, b = (" ".join(rng.choice(["cats", "dogs", "rain", "sing", "the"]) for _ in range(rng.randint(2, 6)))
                for _ in "ab")
        docs.append(encode_chat(tok, judge.judge_messages(CHAT_ROW["messages"], a, b) +
                                [{"role": "assistant", "content": "[[A]]"}], thinking=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for step in range(16):
        ids, mask = docs[step % len(docs)]
        x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
        logits = model(x)[0]
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        loss = torch.nn.functional.cross_entropy(logits[keep], y[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.save_pretrained(path, state_dict=model.state_dict())
    tok.save_pretrained(path)
    return path


def test_local_judge_is_deterministic_whatever_the_batch_and_its_position_bias_cancels(toy_judge):
    spec = judge.check_reward_model(str(toy_judge), init="unused")
    assert spec == dict(kind="local", path=str(toy_judge))
    whole = judge.open_judge(spec, common.Dist(), thinking=False, max_new_tokens=12)
    texts = ["<think></think>Cats are fine.", "<think></think>Dogs bark. Dogs bark.", "<think></think>Rain.",
             "<think></think>Cut off mid"]
    finished = [True, True, True, False]
    rewards, counts = judge.score_groups(whole, [CHAT_ROW["messages"]], texts, finished, 4, thinking=False,
                                         judge_format="pairwise")
    assert counts["unparsable"] == 0 and counts["ties"] == 0 and counts["judgements"] == 6
    assert counts["consistent"] == 0                               # always [[A]]: each order contradicts the other
    assert rewards == [2 / 3, 2 / 3, 2 / 3, 0.0]                   # ties between the three, wins over the cut-off
    one_at_a_time = judge.open_judge(spec, common.Dist(), thinking=False, max_new_tokens=12, batch=1)
    convs = [judge.judge_messages(CHAT_ROW["messages"], a, b) for a, b in (("x", "y"), ("a longer answer", "b"))]
    assert one_at_a_time.complete(convs) == whole.complete(convs) == whole.complete(convs)
    assert [judge.parse_verdict(t) for t in whole.complete(convs)] == ["A", "A"]


def test_a_judge_prompt_longer_than_the_context_is_a_tie_not_a_crash(tmp_path):
    path = toy_export(tmp_path / "short", {4: 0.0}, max_position_embeddings=64)
    local = judge.open_judge(judge.check_reward_model(str(path), init=""), common.Dist(), max_new_tokens=8)
    rewards, counts = judge.score_groups(local, [CHAT_ROW["messages"]], ["<think>\n</think>\n" + "cats " * 80,
                                                                          "<think>\n</think>\nshort"], [True, True], 2)
    assert counts["unparsable"] == 2 and rewards == [0.5, 0.5]


# -- the endpoint judge: an OpenAI-compatible server on a real socket -------------------------------------------------


class FakeServer:
    """/v1/models and /v1/chat/completions over HTTP in a thread. The judge likes few commas: a rating is 3 minus
    the answer's commas (0 at least), a pairwise verdict prefers the answer with fewer ([[C]] when equal); after
    `answer_first` completions (None = always) it stops answering (holds the connection open until the server
    closes)."""

    def __init__(self, answer_first=None):
        self.requests, self.answer_first, self.release = [], answer_first, threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self.reply({"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})
                self.send_error(404)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self.send_error(404)
                server.requests.append(request)
                if server.answer_first is not None and len(server.requests) > server.answer_first:
                    server.release.wait(30)
                    return
                if "\n\n[A]\n" in request["messages"][0]["content"]:
                    a, b = answers(request["messages"])
                    v = "C" if a.count(",") == b.count(",") else "A" if a.count(",") < b.count(",") else "B"
                else:
                    v = max(3 - rated_answer(request["messages"]).count(","), 0)
                self.reply({"choices": [{"index": 0, "message": {"role": "assistant", "content": f"[[{v}]]"},
                                         "finish_reason": "stop"}]})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.mark.parametrize("judge_format", judge.FORMATS)
def test_endpoint_judge_over_http(server, judge_format):
    spec = judge.check_reward_model(server.url + "/chat/completions", init="")     # the full URL works too
    assert spec == dict(kind="remote", url=server.url, model="fake-judge")
    remote = judge.open_judge(spec, common.Dist(), max_new_tokens=32, batch=3)
    texts = ["<think>\n</think>\nthe cat", "<think>\n</think>\nthe, cat", "<think>\n</think>\nthe, the, cat",
             "<think>\n</think>\ncat"]
    rewards, counts = judge.score_groups(remote, [PROSE_ROW["messages"]], texts, [True] * 4, 4,
                                         judge_format=judge_format)
    first = server.requests[0]
    assert first["model"] == "fake-judge" and first["temperature"] == 0 and first["max_tokens"] == 32
    if judge_format == "rating":                            # 3 minus the commas, over 3
        assert rewards == pytest.approx([1.0, 2 / 3, 1 / 3, 1.0])
        assert counts["judgements"] == len(server.requests) == 4
        assert first["messages"][0]["content"].startswith(judge.RATING_INSTRUCTION)
    else:                                                   # win rates; every pair asked both ways
        assert rewards == [(0.5 + 1 + 1) / 3, (0 + 0 + 1) / 3, 0.0, (0.5 + 1 + 1) / 3]
        assert counts["judgements"] == len(server.requests) == 12 and counts["consistent"] == 6
        assert first["messages"][0]["content"].startswith(judge.INSTRUCTION)


def test_endpoint_that_stops_answering_raises_a_named_error_after_its_retries():
    quiet = FakeServer(answer_first=0)
    try:
        remote = judge.open_judge(judge.check_reward_model(quiet.url, init=""), common.Dist(), timeout=0.3,
                                  retries=1)
        with pytest.raises(judge.JudgeError, match=r"no answer after 2 tries of 0.3 s"):
            remote.complete([judge.judge_messages(CHAT_ROW["messages"], "a", "b")])
        assert len(quiet.requests) == 2                                # asked, then asked once more
    finally:
        quiet.close()


def test_bad_reward_models_are_named_before_anything_loads(tmp_path):
    listener = socket.socket()                          # accepts connections, never answers: the probe times out
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        with pytest.raises(judge.JudgeError, match="does not answer"):
            judge.check_reward_model(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", init="", timeout=0.3)
    finally:
        listener.close()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()                                        # nothing listens there: connection refused
    with pytest.raises(judge.JudgeError, match="does not answer"):
        judge.check_reward_model(f"http://127.0.0.1:{port}/v1", init="", timeout=0.3)
    with pytest.raises(judge.JudgeError, match="no such checkpoint directory"):
        judge.check_reward_model(str(tmp_path / "nowhere"), init="")
    big = toy_export(tmp_path / "big", {4: 0.0}, vocab_size=1024)      # the shipped tokenizer has 2048 ids
    with pytest.raises(judge.JudgeError, match="tokenizer has 2048 tokens but the model's vocab_size is 1024"):
        judge.check_reward_model(str(big), init="")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(judge.JudgeError, match="reward_model .*broken"):
        judge.check_reward_model(str(tmp_path / "broken"), init="")


# -- the chat domain's hidden criteria and the shipped judgement data ------------------------------------------------


@pytest.mark.parametrize("row, answer, met", [
    (CHAT_ROW, "- Cats make people happy.\n- My cat needs a lot of care.", (True, True, True)),
    (PROSE_ROW, "Cats make people happy. A small cat needs care.", (True, True, True)),
    (CHAT_ROW, "- Dogs make people happy.\n- Our dog needs care.", (False, True, True)),        # off topic
    (CHAT_ROW, "- Concatenation makes people happy.\n- Dogs too.", (False, True, True)),      # "cat" inside a word
    (CHAT_ROW, "Cats make people happy. My cat needs care.", (True, False, True)),            # prose for a list
    (CHAT_ROW, "- Cats make people happy.", (True, False, True)),                              # a list of one
    (PROSE_ROW, "- Cats make people happy.\n- Cats need care.", (True, False, True)),         # a list for prose
    (PROSE_ROW, "Cats make people happy. Cats need care. Cats  make people HAPPY.", (True, True, False)),
    (CHAT_ROW, "- Cats make people happy.\n- Cats need care.\n- Cats make people happy.", (True, True, False)),
    (PROSE_ROW, "", (False, False, False)),
])
def test_chat_hidden_criteria(row, answer, met):
    assert tuple(tasks.chat.criteria(row, answer).values()) == met
    assert tasks.reward(row, "<think>\nx\n</think>\n" + answer) == float(all(met))
    assert tasks.chat.score(row, answer) == sum(met)


def test_shipped_chat_answers_take_sentence_k_from_slot_k_and_slip_into_lists(generate):
    """No two sentences of an SFT chat answer share a predicate (sentence k's is from slot k), and the teacher's
    slip is a prose request answered as a list of the same kind of sentences."""
    rows = [r for r in map(json.loads, open(os.path.join(ROOT, "data", "sft.jsonl"))) if r["domain"] == "chat"]
    slips = [r for r in rows if "teacher_slip" in r]
    assert {r["format"] for r in slips} == {"prose"} and 0.25 < len(slips) / len(rows) < 0.45
    for r in rows:
        answer = tasks.final_answer(r["messages"][-1]["content"], True)
        said = [s.strip().removeprefix("- ") for s in re.split(r"(?<=\.)\s+", answer)]
        assert 2 <= len(said) <= 3
        for k, sentence in enumerate(said):
            assert any(sentence.endswith(f" {p}.") for p in generate.CHAT_SLOTS[k]), (k, answer)
        assert answer.startswith("- ") == (r["format"] == "list" or "teacher_slip" in r)


def test_chat_rows_are_checked():
    with pytest.raises(tasks.ExampleError, match="field 'format'"):
        tasks.example_from_row(dict(CHAT_ROW, format="poem"))
    with pytest.raises(tasks.ExampleError, match="field 'topic'"):
        tasks.example_from_row(dict(CHAT_ROW, topic="cats"))


def test_shipped_judgements_follow_the_hidden_criteria(generate):
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "data", "judge_sft.jsonl"))]
    assert len(rows) == generate.JUDGE_RATINGS and {r["domain"] for r in rows} == {"judge"}
    heldout = [json.loads(line) for line in open(os.path.join(ROOT, "data", "judge.jsonl"))]
    assert len(heldout) == generate.JUDGE_PAIRS
    calls = re.compile(r"Topic (yes|no), format (yes|no), repeats (no|yes)\. Score ([0-3])\.\n</think>\n"
                       r"\[\[([0-3])\]\]$")
    row_prompts, ratings = set(), []
    for r in rows:                   # each rating is the hidden criteria's count, and so is each of its calls
        user = r["messages"][0]["content"]
        assert user.startswith(judge.RATING_INSTRUCTION)
        prompt, answer = user.split("[User]\n")[1].split("\n\n[Answer]\n")
        found = calls.search(r["messages"][-1]["content"])
        assert found and found[4] == found[5], r["messages"][-1]["content"]
        met = dict(topic=found[1] == "yes", format=found[2] == "yes", no_repeat=found[3] == "no")
        assert int(found[5]) == sum(met.values())
        asked = re.search(r"Asked: (.+), (list|prose)\.", r["messages"][-1]["content"])
        assert any(re.fullmatch(re.escape(ask).replace(r"\{name\}", r"\w+").replace(r"\{topic\}", re.escape(asked[1])),
                                prompt) for ask in generate.CHAT_ASKS[asked[2]]), (prompt, asked[0])
        truth = tasks.chat.criteria(dict(topic=generate.TOPICS[asked[1]], format=asked[2]), answer)
        assert truth == met
        row_prompts.add(prompt)
        ratings.append(int(found[5]))
    assert set(ratings) == {0, 1, 2, 3}
    for p in heldout:                                    # held-out labels are the criteria's verdicts
        scores = [tasks.chat.score(p, x) for x in p["responses"]]
        assert p["better"] == ("A" if scores[0] > scores[1] else "B" if scores[1] > scores[0] else "C")
    assert {p["better"] for p in heldout} == {"A", "B", "C"}
    chat_prompts = {r["messages"][0]["content"] for f in ("sft", "rl", "eval")
                    for r in map(json.loads, open(os.path.join(ROOT, "data", f"{f}.jsonl"))) if r["domain"] == "chat"}
    held_prompts = {p["messages"][0]["content"] for p in heldout}
    assert not held_prompts & row_prompts and not (held_prompts | row_prompts) & chat_prompts


# -- the RLHF stage --------------------------------------------------------------------------------------------------

RLHF_STAGE = dict(name="rlhf", domains=["chat"], steps=3, prompts_per_step=2, rollouts=4, lr=1e-2,
                  max_new_tokens=8, thinking=False, kl_coef=0.03, max_fill_rounds=1, judge_timeout_s=5,
                  judge_retries=1)


@pytest.fixture(scope="module")
def rlhf_dir(tmp_path_factory):
    """The toy policy of tests/test_rl.py (short strings of ' the', 'imple', ',' and <|im_end|>: the fake judge,
    which prefers fewer commas, gives groups with reward variance) and chat prompts."""
    root = tmp_path_factory.mktemp("rlhf")
    toy_export(root / "init", {294: 0.0, 1181: 0.0, 24: 0.0, 4: 0.0})
    prompts = [dict(CHAT_ROW, messages=[{"role": "user", "content": f"Give {n} a short list about cats."}])
               for n in ("Ana", "Ben", "Cleo", "Dev")]
    (root / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (root / "eval.jsonl").write_text(json.dumps(PROSE_ROW) + "\n")
    return root


def rlhf_args(root, out, url, **kw):
    (root / f"{out}.json").write_text(json.dumps(dict(eval_per_domain=1, eval_max_new_tokens=8, save_every=1,
                                                      stages=[dict(RLHF_STAGE, reward_model=url)])))
    opts = dict(config=root / f"{out}.json", init=root / "init", out_dir=root / out, train_data=root / "rl.jsonl",
                eval_data=root / "eval.jsonl", device="cpu")
    opts.update(kw)
    return [f"--{k}={v}" for k, v in opts.items()]


def judged_log(out_dir):
    return [(r["step"], r["loss"], r["reward"], r["judgements"], r["judge_unparsable_frac"])
            for r in common.read_metrics(os.path.join(out_dir, "rlhf", "metrics.jsonl")) if "loss" in r]


def run_rl(args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return run_killing_group([sys.executable, os.path.join(ROOT, "rl.py")] + args, env=env)


@pytest.fixture(scope="module")
def whole_log(rlhf_dir):
    """The uninterrupted RLHF stage with the endpoint judge: its per-step losses, rewards and judge counts."""
    s = FakeServer()
    try:
        whole = run_rl(rlhf_args(rlhf_dir, "whole", s.url))
    finally:
        s.close()
    assert whole.returncode == 0, whole.stderr[-3000:]
    return judged_log(rlhf_dir / "whole")


def test_rlhf_stage_resumes_after_a_kill_with_identical_rewards(rlhf_dir, whole_log, server):
    root = rlhf_dir
    killed = run_rl(rlhf_args(root, "resumed", server.url, inject_kill_at_step=2))
    assert killed.returncode == -9 and not os.path.exists(root / "resumed" / "rlhf" / "export")
    resumed = run_rl(rlhf_args(root, "resumed", server.url))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    log = whole_log
    assert judged_log(root / "resumed") == log and len(log) == 3
    assert any(loss != 0 for _, loss, *_ in log)                  # the judge's rewards had variance: it trained
    assert all(judgements > 0 for *_, judgements, _ in log)
    rows = json.loads((root / "resumed" / "cascade.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["sft", "rlhf"] and set(rows[-1]["scores"]) == {"chat"}


def test_rlhf_stage_under_torchrun_resumes_after_a_kill_with_identical_rewards(rlhf_dir, server):
    """Two processes (each judges its own groups through the endpoint): SIGKILL-ed at step 2 and rerun, the
    stage's per-step losses, rewards and judge counts equal those of the uninterrupted two-process stage."""
    root = rlhf_dir
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = lambda args: run_torchrun([os.path.join(ROOT, "rl.py")] + args, env)       # noqa: E731
    whole = run(rlhf_args(root, "whole2", server.url))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run(rlhf_args(root, "resumed2", server.url, inject_kill_at_step=2))
    assert killed.returncode != 0 and not os.path.exists(root / "resumed2" / "rlhf" / "export")
    resumed = run(rlhf_args(root, "resumed2", server.url))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = judged_log(root / "whole2")
    assert judged_log(root / "resumed2") == log and len(log) == 3
    assert any(loss != 0 for _, loss, *_ in log) and all(judgements > 0 for *_, judgements, _ in log)


def test_rlhf_stage_in_process_judge_and_a_judge_that_stops_answering(rlhf_dir, toy_judge, whole_log):
    """The in-process judge (pairwise) through the stage (its metrics, the held-out score by the hidden criteria);
    then an endpoint that stops answering in step 2: a named error, step 1's checkpoint intact, and a rerun with
    the endpoint back finishes with the rewards of the uninterrupted stage."""
    root = rlhf_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cascade = rl.main(*rl.parse_args(rlhf_args(root, "local", str(toy_judge), max_steps=1,
                                                   set="rlhf.judge_thinking=false,rlhf.judge_max_new_tokens=12,"
                                                       "rlhf.judge_format=pairwise")))
    metrics = [r for r in common.read_metrics(root / "local" / "rlhf" / "metrics.jsonl") if "loss" in r][0]
    assert metrics["judge_unparsable_frac"] == 0 and metrics["judge_consistent_frac"] == 0   # always [[A]]
    assert metrics["hidden_reward"] == 0 and "judge_agreement" not in metrics   # the verifier ranks none apart
    assert cascade["rows"][-1]["scores"] == {"chat": 0.0}                       # scored by the hidden criteria
    quiet = FakeServer(answer_first=whole_log[0][3])      # step 1's judgements, then silence
    try:
        args = rlhf_args(root, "stopped", quiet.url, set="rlhf.judge_timeout_s=0.3,rlhf.judge_retries=1")
        with warnings.catch_warnings(), pytest.raises(SystemExit) as stopped:
            warnings.simplefilter("ignore")
            common.run_main(lambda a: rl.main(*a), rl.parse_args(args))
        assert stopped.value.code == 2
    finally:
        quiet.close()
    ckpts = os.listdir(root / "stopped" / "rlhf" / "checkpoints")
    assert ckpts and not os.path.exists(root / "stopped" / "rlhf" / "export")
    healthy = FakeServer()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rl.main(*rl.parse_args(rlhf_args(root, "stopped", healthy.url)))
    finally:
        healthy.close()
    assert os.path.isfile(root / "stopped" / "rlhf" / "export" / "config.json")
    assert judged_log(root / "stopped") == whole_log


def test_rlhf_stage_named_errors(rlhf_dir, tmp_path):
    root = rlhf_dir
    with pytest.raises(options.ConfigError, match=r"stage 'rlhf': reward_model .*nowhere: no such checkpoint"):
        rl.main(*rl.parse_args(rlhf_args(root, "err1", str(tmp_path / "nowhere"))))
    assert not os.path.exists(root / "err1" / "rlhf")                           # before any model loaded
    bad = dict(RLHF_STAGE, domains=["chat", "agent"], reward_model="init")
    (tmp_path / "p.json").write_text(json.dumps(dict(stages=[bad])))
    with pytest.raises(options.ConfigError, match=r"judges single-turn responses; \['agent'\] are multi-turn"):
        rl.main(*rl.parse_args(rlhf_args(root, "err2", "init", config=tmp_path / "p.json")))
    (tmp_path / "p.json").write_text(json.dumps(dict(stages=[dict(RLHF_STAGE, domains=["sft/chat"])])))
    with pytest.raises(options.ConfigError, match=r"unknown domain\(s\) \['sft/chat'\]"):    # no judge, no verifier
        rl.main(*rl.parse_args(rlhf_args(root, "err3", "", config=tmp_path / "p.json")))


def test_memory_model_counts_an_in_process_judge_and_the_reference():
    import subprocess

    from memory import memory_model
    from model import Model, ModelConfig
    cfg = ModelConfig.from_json(os.path.join(ROOT, "configs", "tiny_model.json"))
    with torch.device("meta"):
        P, gpus = Model(cfg).num_params()["total"], 2
    plain = memory_model(cfg, 256, gpus)
    both = memory_model(cfg, 256, gpus, ref=True, judge=cfg, judge_rows=8, judge_len=512)
    assert "frozen" not in plain["train"] and "judge" not in plain
    assert both["train"]["frozen"] == 4 * 2 * P / gpus                    # fp32 shards of the reference and judge
    assert both["train"]["total"] == pytest.approx(plain["train"]["total"] + 8 * P / gpus)
    j = both["judge"]
    assert j["shards"] == 4 * P / gpus and j["params"] == 2 * P             # gathered in bf16 while judging
    assert j["total"] == j["params"] + 8 * j["cache_per_row"] and j["cache_per_row"] > plain["sample"]["cache_per_row"]
    out = subprocess.run([sys.executable, "model.py", "configs/tiny_model.json", "--memory", "--seq_len", "256",
                          "--ref", "--judge", "configs/tiny_model.json", "--judge-rows", "8"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "frozen" in out.stdout and "judge (configs/tiny_model.json): fp32 shards" in out.stdout
