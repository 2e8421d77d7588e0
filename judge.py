"""
The generative reward model of the RLHF stage: a judge LLM reads the prompt and a rollout's answer (or two of
them), writes a judgement and ends it with a verdict; a group's rewards come from the verdicts.

DESIGN.md section 7: after MOPD the paper runs RLHF, GRPO rewarded by a generative reward model with a KL term of
0.03 to the stage's start, about 25-30 steps. Which verdict the paper's judge writes is not in what we could read
of arXiv 2603.19220; the GenRM NVIDIA released for Nemotron 3 (Nemotron-Cascade 2 is post-trained from
Nemotron 3 Nano's base) reads two responses to one conversation and writes a helpfulness score for each and a
ranking. Both verdicts are here, chosen by `judge_format`:

  rating (pointwise; the tiny pipeline's): the judge reads one answer and ends with [[0]] .. [[3]]

    r_i = rating_i / 3;   an unparsable rating: the mean of the group's other rewards (a tie: advantage 0)

    n judgements per group of n. A judge that reads one answer at a time compares it with the prompt only, which
    a few-million-parameter judge can learn (docs/results.md: 83% of held-out pairs ordered right, against 2%
    for the same model judging pairs).

  pairwise: the judge reads two answers and ends with [[A]], [[B]] or [[C]] (a tie), the LLM-as-a-judge format,
  asked in both orders because judges favour a position:

    p(i, j)  = 1 if the verdict prefers i, 0 if it prefers j, 1/2 for a tie or an unparsable verdict
    s_ij     = (p(i, j | i shown as A) + p(i, j | i shown as B)) / 2;  s_ij = 1 when j is cut off
    r_i      = (1 / (n - 1)) sum_{j != i} s_ij       the win rate of rollout i in its group of n, in [0, 1]

    n (n - 1) judgements per group; with `opponents` k > 0 each rollout meets only the 2k nearest round the
    group (2 n k judgements), and r_i is the mean over those.

A rollout cut off by its token budget, or whose thought never closes, is never shown to the judge: it scores 0
(and loses every comparison), as the verifiers score it (DESIGN.md section 7). The judge sees each response's
final answer (the text after </think>), as a multi-turn history keeps only the final answers of earlier turns.

One function, two backends (open_judge): an HF-format checkpoint that model.py loads, run in process through
sample.generate (greedy, so the same rollouts get the same rewards: a resumed stage repeats its rewards exactly);
or a remote OpenAI-compatible server (`/v1/chat/completions`, e.g. vLLM serving a large judge), reached with the
standard library only, temperature 0. The judge reads the rollouts as text, so its tokenizer need not be the
policy's; it must be its own model's (common.check_tokenizer). Bad input is found before the first step
(check_reward_model): a checkpoint that does not load, a tokenizer that does not fit it, an endpoint that does not
answer. A request that times out mid-stage is retried `retries` times, then JudgeError stops the stage with its
last checkpoint intact.

    python judge.py --judge out/judge/export                      # agreement with the hidden criteria on
    python judge.py --judge http://localhost:8000/v1 --limit 50   # data/judge.jsonl's held-out pairs
"""
import argparse
import itertools
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import common
import options
import tasks

FORMATS = ("rating", "pairwise")
RATING_INSTRUCTION = ("Rate the answer: the asked topic, the asked format, no sentence said twice. "
                      "End with [[0]] to [[3]].")
RATING = re.compile(r"\[\[\s*([0-3])\s*\]\]")
TOP_RATING = 3
INSTRUCTION = "Which answer is better? End with [[A]], [[B]] or [[C]] for a tie."
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.I)
SWAPPED = {"A": "B", "B": "A", "C": "C"}    # a verdict with the two answers' order undone


class JudgeError(options.ConfigError):
    """The reward model cannot judge: a bad checkpoint or URL before the first step, or an endpoint that stops
    answering mid-stage. A ConfigError, so that the stage scripts end with its message, not a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# The prompt, the verdict and the rewards


def conversation_text(prompt_messages) -> str:
    """The conversation so far as the judge reads it: each message a [Role] block."""
    return "\n\n".join(f"[{m['role'].capitalize()}]\n{m['content']}" for m in prompt_messages)


def rating_messages(prompt_messages, answer: str) -> list[dict]:
    """The rating judge's conversation: one user turn holding the instruction, the conversation so far and one
    final answer. data/generate.py writes the tiny judge's SFT examples with it."""
    context = conversation_text(prompt_messages)
    return [{"role": "user", "content": f"{RATING_INSTRUCTION}\n\n{context}\n\n[Answer]\n{answer.strip()}"}]


def judge_messages(prompt_messages, a: str, b: str) -> list[dict]:
    """The pairwise judge's conversation: one user turn holding the instruction, the conversation so far and the
    two final answers."""
    context = conversation_text(prompt_messages)
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{context}\n\n[A]\n{a.strip()}\n\n[B]\n{b.strip()}"}]


def parse_verdict(text, thinking=None, pattern=VERDICT):
    """"A", "B" or "C" (a tie): the last [[X]] of the judgement's final answer; None when there is none, when the
    judgement's thought never closes, or when no judgement came back (text None). pattern=RATING reads a rating
    ("0" .. "3")."""
    answer = tasks.final_answer(text, thinking) if text is not None else None
    found = pattern.findall(answer or "")
    return found[-1].upper() if found else None


def preference(verdict) -> float:
    """p(A over B) for one verdict: a tie and an unparsable verdict both count 1/2."""
    return {"A": 1.0, "B": 0.0}.get(verdict, 0.5)


def pair_score(v_ab, v_ba) -> float:
    """s_ij (the formula at the top): i's preference over j, from the verdict with i shown as A (v_ab) and the one
    with i shown as B (v_ba)."""
    return (preference(v_ab) + 1.0 - preference(v_ba)) / 2


def opponent_pairs(n, opponents=0):
    """The pairs (i, j), i < j, a group of n compares: all of them (opponents 0), or each rollout against the next
    `opponents` ones round the group (2 * opponents opponents each, n * opponents pairs), which bounds the
    judgements per group at 2 n opponents instead of n (n - 1) (16 rollouts, 4: 128 instead of 240)."""
    if not opponents or 2 * opponents >= n - 1:
        return list(itertools.combinations(range(n), 2))
    return sorted({tuple(sorted((i, (i + k) % n))) for i in range(n) for k in range(1, opponents + 1)})


def group_rewards(ok, verdicts, pairs=None):
    """Win rates r_i of a group (the formula at the top, the mean over the opponents i is compared with: every
    other rollout, or those of `pairs`). ok[i]: rollout i may be judged (it finished and its thought closed);
    verdicts[(i, j)]: the verdict with i shown as A and j as B, for both orders of every compared pair of ok
    rollouts. Returns the rewards and the pairs' s_ij ({(i, j): s_ij} for i < j, both ok)."""
    n = len(ok)
    pairs = opponent_pairs(n) if pairs is None else pairs
    s, opponents = {}, [[] for _ in range(n)]
    for i, j in pairs:
        opponents[i].append(j)
        opponents[j].append(i)
        if ok[i] and ok[j]:
            s[i, j] = pair_score(verdicts[i, j], verdicts[j, i])

    def s_of(i, j):
        if not ok[j]:
            return 1.0
        return s[i, j] if i < j else 1.0 - s[j, i]
    rewards = [sum(s_of(i, j) for j in opponents[i]) / max(len(opponents[i]), 1) if ok[i] else 0.0
               for i in range(n)]
    return rewards, s


def parse_rating(text, thinking=None):
    """The rating 0 .. TOP_RATING of a judgement (the last [[k]] of its final answer); None when unparsable."""
    found = parse_verdict(text, thinking, RATING)
    return None if found is None else int(found)


def rating_rewards(ok, ratings):
    """r_i of a group from its ratings (the formula at the top): rating / TOP_RATING for a judged rollout, 0 for one
    that could not be judged (ok[i] False), and for an unparsable rating (None) the mean of the others' rewards,
    so that its advantage is 0, as a tie's."""
    known = [r / TOP_RATING if k else 0.0 for k, r in zip(ok, ratings) if not k or r is not None]
    fill = sum(known) / len(known) if known else 0.5
    return [(fill if r is None else r / TOP_RATING) if k else 0.0 for k, r in zip(ok, ratings)]


def score_groups(judge, prompts, texts, finished, n, thinking=True, hidden=None, opponents=0, judge_format="rating"):
    """
    The judge's rewards for groups of n rollouts: prompts[g] is group g's prompt messages, texts[g * n + k] and
    finished[g * n + k] rollout k's decoded response and whether it ended on a stop token. judge_format "rating":
    one judgement per judgeable rollout; "pairwise": two per compared pair (opponent_pairs), one per order. All
    judgements go to the judge at once.
    hidden: the rollouts' verifier rewards, if the domain has a verifier, for the agreement count.
    Returns (rewards, counts): counts holds judgements, ties (verdict C), unparsable, pairs, consistent (pairs
    whose two orders agree), decided and agreed (pairs of judged rollouts whose hidden rewards differ, and those
    the judge ranks the same way: by their two verdicts, or by their ratings).
    """
    if judge_format not in FORMATS:
        raise JudgeError(f"judge_format {judge_format!r}: expected one of {FORMATS}")
    answers = [tasks.final_answer(t, thinking) if ok else None for t, ok in zip(texts, finished)]
    counts = dict(judgements=0, ties=0, unparsable=0, pairs=0, consistent=0, decided=0, agreed=0)

    def count_agreement(i, j, order):          # order: > 0 when the judge ranks i above j, < 0 below, 0 a tie
        if hidden is not None and hidden[i] != hidden[j]:
            counts["decided"] += 1
            counts["agreed"] += order != 0 and (order > 0) == (hidden[i] > hidden[j])

    if judge_format == "rating":
        jobs = [k for k, a in enumerate(answers) if a is not None]
        outs = judge.complete([rating_messages(prompts[k // n], answers[k]) for k in jobs])
        ratings = [None] * len(answers)
        for k, text in zip(jobs, outs):
            ratings[k] = parse_rating(text, judge.thinking)
        counts.update(judgements=len(jobs), unparsable=sum(ratings[k] is None for k in jobs))
        rewards = []
        for g in range(len(prompts)):
            rewards += rating_rewards([a is not None for a in answers[g * n:(g + 1) * n]], ratings[g * n:(g + 1) * n])
            for i, j in itertools.combinations(range(g * n, (g + 1) * n), 2):
                if answers[i] is not None and answers[j] is not None:
                    count_agreement(i, j, rewards[i] - rewards[j])
        return rewards, counts

    pairs, jobs = opponent_pairs(n, opponents), []
    for g in range(len(prompts)):
        for i, j in pairs:
            if answers[g * n + i] is not None and answers[g * n + j] is not None:
                jobs += [(g, i, j), (g, j, i)]
    outs = judge.complete([judge_messages(prompts[g], answers[g * n + i], answers[g * n + j]) for g, i, j in jobs])
    verdicts = [parse_verdict(t, judge.thinking) for t in outs]
    by_group = [{} for _ in prompts]
    for (g, i, j), v in zip(jobs, verdicts):
        by_group[g][i, j] = v
    counts.update(judgements=len(jobs), ties=verdicts.count("C"), unparsable=verdicts.count(None))
    rewards = []
    for g, vs in enumerate(by_group):
        r, s = group_rewards([a is not None for a in answers[g * n:(g + 1) * n]], vs, pairs)
        rewards += r
        for (i, j), s_ij in s.items():
            counts["pairs"] += 1
            counts["consistent"] += vs[i, j] is not None and vs[j, i] == SWAPPED[vs[i, j]]
            count_agreement(g * n + i, g * n + j, s_ij - 0.5)
    return rewards, counts


# ----------------------------------------------------------------------------------------------------------------
# The two backends


class LocalJudge:
    """A checkpoint in this process: greedy judgements through sample.generate, `batch` prompts per call (0 = all
    at once). Under FSDP the judge is sharded like a reference model and gathered once per complete() call, which
    every process makes once per rollout round (sampling_weights is a collective)."""

    def __init__(self, model, tokenizer, max_new_tokens=96, thinking=True, batch=0):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.thinking, self.batch = thinking, batch

    def complete(self, conversations):
        import sample
        from tokenizer import encode_prompt
        room = self.model.config.max_position_embeddings - self.max_new_tokens
        prompts = [encode_prompt(self.tokenizer, c, thinking=self.thinking) for c in conversations]
        fits = [i for i, p in enumerate(prompts) if len(p) <= room]     # an over-long pair: no verdict (a tie)
        outs = [None] * len(prompts)
        step = self.batch or max(len(fits), 1)
        with sample.sampling_weights(self.model):
            for start in range(0, len(fits), step):
                part = fits[start:start + step]
                done = sample.generate(self.model, [prompts[i] for i in part], self.max_new_tokens, temperature=0.0,
                                       stop_token_ids=self.tokenizer.stop_token_ids)
                for i, c in zip(part, done):
                    outs[i] = sample.response_text(self.tokenizer, c, self.thinking)
        return outs


class RemoteJudge:
    """An OpenAI-compatible server: one POST to {url}/chat/completions per judgement, `workers` in flight,
    temperature 0. A timeout, a refused connection or a 429 / 5xx answer is retried `retries` times with a
    doubling pause, then JudgeError; another HTTP error is a JudgeError at once (a bad request will not heal)."""
    thinking = None                            # the server renders the template: the verdict is in its content

    def __init__(self, url, model_name, max_new_tokens=96, timeout=60.0, retries=3, workers=16):
        self.url, self.model_name, self.max_new_tokens = url, model_name, max_new_tokens
        self.timeout, self.retries, self.workers = timeout, retries, max(workers, 1)

    def complete(self, conversations):
        if not conversations:
            return []
        with ThreadPoolExecutor(max_workers=min(self.workers, len(conversations))) as pool:
            return list(pool.map(self._one, conversations))

    def _one(self, messages):
        body = dict(model=self.model_name, messages=messages, temperature=0.0, max_tokens=self.max_new_tokens, seed=0)
        reply = request_json(self.url + "/chat/completions", body, self.timeout, self.retries)
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return None                                       # not an OpenAI-style reply: unparsable, a tie


def request_json(url, body=None, timeout=60.0, retries=3):
    """GET (body None) or POST JSON to url; the decoded JSON reply. Retries transient failures (see RemoteJudge)."""
    data = None if body is None else json.dumps(body).encode()
    why = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2.0 ** (attempt - 1), 30.0))
        try:
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            why = f"HTTP {e.code} {e.reason}"
            if e.code != 429 and e.code < 500:
                raise JudgeError(f"reward model {url}: {why}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            why = str(getattr(e, "reason", e)) or type(e).__name__
        except json.JSONDecodeError as e:
            raise JudgeError(f"reward model {url}: the reply is not JSON ({e})") from None
    raise JudgeError(f"reward model {url}: no answer after {retries + 1} tries of {timeout:g} s ({why})")


def endpoint_base(url: str) -> str:
    """The OpenAI base URL (…/v1) of what a stage names: the base itself or its /chat/completions."""
    return url.rstrip("/").removesuffix("/chat/completions")


def check_reward_model(source, init, timeout=60.0):
    """
    The judge a stage names, checked before any model loads; returns its spec for open_judge. source: a URL
    (http:// or https://: its /models is asked, which also names the served model), "init" (the run's --init
    checkpoint: the tiny pipeline's SFT model, which learnt to judge from data/generate.py's judgement
    examples), or an HF checkpoint directory (config.json, safetensors headers and its tokenizer are read).
    """
    if source.startswith(("http://", "https://")):
        base = endpoint_base(source)
        try:
            models = request_json(base + "/models", timeout=timeout, retries=0)
            name = models["data"][0]["id"]
        except JudgeError as e:
            raise JudgeError(f"reward_model {source}: the endpoint does not answer ({e})") from None
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"reward_model {source}: {base}/models lists no model (not an OpenAI-compatible "
                             "server?)") from None
        return dict(kind="remote", url=base, model=name)
    path = init if source == "init" else source
    why = options.model_source(path)
    if why or not os.path.isdir(path):
        raise JudgeError(f"reward_model {source}: {why or 'a config file, not a checkpoint directory'}")
    from model import Model
    from tokenizer import load_tokenizer
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:                       # noqa: BLE001 (any reason the file does not load is the message)
        raise JudgeError(f"reward_model {source}: its tokenizer does not load ({e})") from None
    try:
        common.check_tokenizer(tokenizer, Model.config_from_pretrained(path), f"reward_model {source}")
    except options.ConfigError as e:
        raise JudgeError(str(e)) from None
    return dict(kind="local", path=path)


def open_judge(spec, d, bf16=False, max_new_tokens=96, thinking=True, batch=0, timeout=60.0, retries=3):
    """The judge of a check_reward_model spec: a LocalJudge (its weights loaded, sharded over the processes like a
    reference model) or a RemoteJudge (batch = requests in flight, 16 when 0)."""
    if spec["kind"] == "remote":
        return RemoteJudge(spec["url"], spec["model"], max_new_tokens, timeout, retries, batch or 16)
    from tokenizer import load_tokenizer
    try:
        model = common.load_policy(spec["path"], d, bf16, trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise JudgeError(f"reward_model {spec['path']}: the checkpoint does not load ({e})") from None
    return LocalJudge(model, load_tokenizer(spec["path"]), max_new_tokens, thinking, batch)


# ----------------------------------------------------------------------------------------------------------------
# Agreement with the hidden criteria on held-out pairs


def agreement(judge, rows, judge_format="rating"):
    """
    The judge on held-out pairs (data/judge.jsonl: {"messages": the prompt, "topic", "format", "responses": [a, b],
    "better": "A", "B" or "C"}, labels from the chat domain's hidden criteria). Returns
      pair_agreement   pairs with a better response where the judge ranks it above the other
      verdict_accuracy verdicts equal to the hidden criteria's: a rating equal to how many criteria hold, or a
                       pairwise verdict equal to the label in its order (a tie must be called a tie)
      consistent       pairwise: pairs whose two verdicts agree once the order is undone
      unparsable       share of judgements that are unparsable
    A "rating" judge rates each response once (an unparsable rating ranks as the middle of the scale); a
    "pairwise" one judges each pair in both orders.
    """
    n = max(len(rows), 1)
    decided = [r for r in rows if r["better"] != "C"]
    if judge_format == "rating":
        items = [(r, a) for r in rows for a in r["responses"]]
        ratings = [parse_rating(t, judge.thinking) for t in judge.complete([rating_messages(r["messages"], a)
                                                                            for r, a in items])]
        right = sum(v == tasks.chat.score(r, a) for (r, a), v in zip(items, ratings))
        ranked = [TOP_RATING / 2 if v is None else v for v in ratings]
        agree = sum((a > b if r["better"] == "A" else b > a)
                    for r, a, b in zip(rows, ranked[0::2], ranked[1::2]) if r["better"] != "C")
        return dict(pairs=len(rows), pair_agreement=agree / max(len(decided), 1), verdict_accuracy=right / (2 * n),
                    unparsable=ratings.count(None) / (2 * n))
    convs = [judge_messages(r["messages"], *r["responses"]) for r in rows] + \
            [judge_messages(r["messages"], *r["responses"][::-1]) for r in rows]
    verdicts = [parse_verdict(t, judge.thinking) for t in judge.complete(convs)]
    right, agree, consistent = 0, 0, 0
    for r, v1, v2 in zip(rows, verdicts[:len(rows)], verdicts[len(rows):]):
        right += (v1 == r["better"]) + (v2 == SWAPPED[r["better"]])
        consistent += v1 is not None and v2 is not None and v1 == SWAPPED[v2]
        if r["better"] != "C":
            s = pair_score(v1, v2)
            agree += s > 0.5 if r["better"] == "A" else s < 0.5
    return dict(pairs=len(rows), pair_agreement=agree / max(len(decided), 1), verdict_accuracy=right / (2 * n),
                consistent=consistent / n, unparsable=verdicts.count(None) / (2 * n))


def main(argv=None):
    ap = argparse.ArgumentParser(description="The judge's agreement with the chat domain's hidden criteria on "
                                 "held-out pairs: each response rated, or each pair judged in both orders.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--judge", required=True, help="HF checkpoint directory or OpenAI-compatible base URL (…/v1)")
    ap.add_argument("--data", default=str(tasks.DATA_DIR / "judge.jsonl"), help="held-out pairs (JSONL)")
    ap.add_argument("--format", default="rating", choices=FORMATS, help="the judge's verdict (see the top)")
    ap.add_argument("--limit", type=int, default=0, help="first N pairs only (0 = all)")
    ap.add_argument("--max_new_tokens", type=int, default=96, help="judgement budget")
    ap.add_argument("--batch", type=int, default=64, help="judgements per generate call / requests in flight")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (in-process judge)")
    ap.add_argument("--out", default="", help="also write the result here (JSON)")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in open(args.data) if line.strip()]
    rows = rows[:args.limit] if args.limit > 0 else rows
    spec = check_reward_model(args.judge, init=args.judge)
    judge = open_judge(spec, common.init_dist(args.device), max_new_tokens=args.max_new_tokens, batch=args.batch)
    t0 = time.perf_counter()
    result = dict(agreement(judge, rows, args.format), judge=args.judge, format=args.format, data=args.data,
                  seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(result, indent=2))
    if args.out:
        common.write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
