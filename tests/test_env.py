"""The multi-turn domains (tasks/env.py): the agent warehouse's tools really executed against the episode's state
(tasks/agent.py), the repair environment's patches and its tests in the sandbox, hostile patches included
(tasks/swe.py), row validation, the shipped SFT conversations replayed through their environments, and the
released SWE-RL row format."""

import json
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import tasks
from tasks.agent import TOOLS

ROOT = Path(__file__).resolve().parent.parent
THINK = "<think>\nplan\n</think>\n"


def call(name, **arguments):
    """One call as the chat template writes it."""
    text = f"<tool_call>\n<function={name}>\n"
    for key, value in arguments.items():
        text += f"<parameter={key}>\n{value}\n</parameter>\n"
    return text + "</function>\n</tool_call>\n"


def turn(*calls, answer=""):
    """An assistant turn as the sampler decodes it: the opener, a thought, then calls or an answer."""
    return THINK + "".join(calls) + answer


def agent_example(goal, tools=("bin_item", "price", "sell", "move", "calculate", "find_bin"), **extra):
    row = {"domain": "agent", "messages": [{"role": "user", "content": "What does the item in bin 3 cost?"}],
           "tools": [TOOLS[t] for t in tools], "state": {"bins": {"3": "pear", "5": "fig", "8": "plum"},
                                                        "prices": {"pear": 4, "fig": 2, "plum": 7}},
           "goal": goal, **extra}
    return tasks.example_from_row(row, "test")


# -----------------------------------------------------------------------------
# The agent domain

def test_registry_and_interface():
    assert tasks.ENV_DOMAINS == ("agent", "swe") and set(tasks.ENVIRONMENTS) == {"agent", "swe"}
    assert set(tasks.GRADED_DOMAINS) == {"math", "if", "mcqa", "json", "code", "tool", "agent", "swe", "chat",
                                         "longctx"}
    assert {"agent", "swe"} <= set(tasks.VERIFIERS)
    example = agent_example({"answer": "4"})
    env = tasks.make_env(example)
    assert isinstance(env, tasks.Environment) and env.max_turns == 4
    assert env.reset() == tasks.prompt_messages(example)
    assert tasks.make_env(agent_example({"answer": "4"}, max_turns=6)).max_turns == 6
    with pytest.raises(ValueError, match="no environment for domain 'math'"):
        tasks.make_env({"domain": "math", "messages": [], "answer": "1"})
    with pytest.raises(ValueError, match="graded by its environment"):
        tasks.reward(example, THINK + "\\boxed{4}")


def test_lookups_return_the_state_and_dependent_calls_earn_1():
    env = tasks.make_env(agent_example({"answer": "4"}))
    assert env.step(turn(call("bin_item", bin=3))) == ([{"role": "tool", "content": "pear"}], False, 0.0)
    assert env.step(turn(call("price", item="pear"))) == ([{"role": "tool", "content": "4"}], False, 0.0)
    assert env.step(turn(answer="The pear costs \\boxed{4}.")) == ([], True, 1.0)
    env.reset()
    assert env.step(turn(call("find_bin", item="plum")))[0][0]["content"] == "8"
    assert env.step(turn(call("bin_item", bin=1)))[0][0]["content"] == "empty"
    assert env.step(turn(call("calculate", expression="3 * (4 + 1) - 6 / 2")))[0][0]["content"] == "12"


def test_a_guess_after_the_first_call_earns_0():
    env = tasks.make_env(agent_example({"answer": "4"}))
    env.step(turn(call("bin_item", bin=3)))
    assert env.step(turn(answer="A pear costs about \\boxed{3}.")) == ([], True, 0.0)
    env.reset()
    assert env.step(turn(answer="It costs 4.")) == ([], True, 0.0)  # the number, but not in \boxed{}


def test_calls_change_the_state_and_the_state_is_graded():
    goal = {"bins": {"5": "fig", "7": "pear", "8": "plum"}}
    env = tasks.make_env(agent_example(goal))
    assert env.step(turn(call("move", item="pear", bin=7)))[0][0]["content"] == "ok: pear is in bin 7"
    assert env.step(turn(call("bin_item", bin=7), call("bin_item", bin=3)))[0] == [
        {"role": "tool", "content": "pear"}, {"role": "tool", "content": "empty"}]  # parallel calls, in order
    assert env.step(turn(call("move", item="fig", bin=8)))[0][0]["content"] == "error: bin 8 is not empty"
    assert env.step(turn(answer="Done.")) == ([], True, 1.0)
    # the state, not the text: a final answer that claims the move without it earns 0; a new episode starts afresh
    env.reset()
    assert env.step(turn(answer="I moved the pear to bin 7.")) == ([], True, 0.0)
    sell = tasks.make_env(agent_example({"bins": {"5": "fig", "8": "plum"}}))
    assert sell.step(turn(call("sell", item="pear")))[0][0]["content"] == "ok: sold pear"
    assert sell.step(turn(call("bin_item", bin=3)))[0][0]["content"] == "empty"
    assert sell.step(turn(answer="Sold."))[2] == 1.0
    wrong = tasks.make_env(agent_example({"bins": {"5": "fig", "8": "plum"}}))
    wrong.step(turn(call("sell", item="fig")))
    assert wrong.step(turn(answer="Sold."))[2] == 0.0


def test_bad_calls_are_observations_and_the_episode_goes_on():
    env = tasks.make_env(agent_example({"answer": "4"}, tools=("bin_item", "price")))
    cases = [(turn(call("teleport", item="pear")), "error: no tool named teleport"),
             (turn(call("move", item="pear", bin=2)), "error: no tool named move"),  # not offered here
             (turn(call("bin_item", bin="three")), "error: bin must be an integer, got 'three'"),
             (turn(call("bin_item")), "error: bin_item needs the argument bin"),
             (turn(call("price", item="pear", colour="red")), "error: price has no argument colour"),
             (turn(call("bin_item", bin=12)), "error: no bin 12"),
             (turn(call("price", item="kiwi")), "error: no item named kiwi"),
             (THINK + "<tool_call>\n<function=price>\n<parameter=item>\npear\n", "error: malformed tool call")]
    for response, error in cases:
        observations, done, reward = env.step(response)
        assert not done and reward == 0.0 and observations[0]["role"] == "tool"
        assert observations[0]["content"].startswith(error), (response, observations)
    calc = tasks.make_env(agent_example({"answer": "4"}))
    for expression in ("__import__('os')", "2 ** 99", "1 / 0", "9" * 80):
        assert calc.step(turn(call("calculate", expression=expression)))[0][0]["content"].startswith("error:")
    # after the errors, the right calls still finish the task
    env.step(turn(call("bin_item", bin=3)))
    env.step(turn(call("price", item="pear")))
    assert env.step(turn(answer="\\boxed{4}")) == ([], True, 1.0)


def test_a_thought_that_never_closes_ends_the_episode_with_0():
    env = tasks.make_env(agent_example({"answer": "4"}))
    assert env.step("<think>\nI look up bin 3 " + call("bin_item", bin=3)) == ([], True, 0.0)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(turn(answer="\\boxed{4}"))


# -----------------------------------------------------------------------------
# The swe domain

CALC = "def add(a, b):\n    return a - b\n"
TEST_CALC = ("from calc import add\n\n\ndef test_add_1():\n    print(add(2, 3))\n\n\n"
             "def test_add_2():\n    print(add(4, 4))\n")
FAST = tasks.SandboxLimits(wall_s=2.0, cpu_s=1)


def swe_example(**extra):
    row = {"domain": "swe", "messages": [{"role": "user", "content": "Fix the bug: add(2, 3) should be 5."}],
           "files": {"calc.py": CALC, "test_calc.py": TEST_CALC},
           "tests": [{"file": "test_calc.py", "name": "test_add_1", "output": "5\n"},
                     {"file": "test_calc.py", "name": "test_add_2", "output": "8\n"}], **extra}
    return tasks.example_from_row(row, "test")


def patch(old, new, path="calc.py"):
    return f"<<<<<<< SEARCH {path}\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n"


def repair(response, env=None):
    env = env or tasks.make_env(swe_example(), limits=FAST)
    return env.step(THINK + response), env


def test_a_good_patch_earns_1():
    (observations, done, reward), env = repair(patch("    return a - b", "    return a + b"))
    assert (observations, done, reward) == ([], True, 1.0), env.outcome
    assert env.max_turns == 3 and env.files["calc.py"] == "def add(a, b):\n    return a + b\n"


def test_a_wrong_patch_gets_a_report_and_the_next_patch_applies_on_top():
    (observations, done, reward), env = repair(patch("    return a - b", "    return a * b"))
    assert not done and reward == 0.0
    assert observations == [{"role": "tool", "content": "2 of 2 tests fail:\ntest_add_1: got 6, expected 5\n"
                                                        "test_add_2: got 16, expected 8"}]
    assert repair(patch("    return a * b", "    return a + b"), env)[0] == ([], True, 1.0)


@pytest.mark.parametrize("response", [
    "I would change the minus to a plus.",                                       # no block
    patch("    return a + b", "    return a * b"),                               # SEARCH not in the file
    patch("return a - b", "return a + b"),                                      # not whole lines
    patch("    return a - b", "    return a + b", path="other.py"),              # unknown file
    "<<<<<<< SEARCH calc.py\n    return a - b\n=======\n    return a + b\n",     # not closed
    "<<<<<<< SEARCH calc.py\n=======\nx = 1\n>>>>>>> REPLACE\n",                 # empty SEARCH
    "=======\n" + patch("    return a - b", "    return a + b"),                 # a stray marker
    patch("    print(add(2, 3))", "    print(5)", path="test_calc.py"),         # the test file
    patch("    return a - b", "    return a + b") + patch("    print(add(4, 4))", "    print(8)", path="test_calc.py"),
])
def test_malformed_patches_and_patches_on_the_tests_end_with_0(response):
    (observations, done, reward), env = repair(response)
    assert (observations, done, reward) == ([], True, 0.0) and env.outcome.startswith("malformed patch")


def test_a_patch_whose_search_text_is_found_twice_is_malformed():
    example = swe_example()
    example["files"]["calc.py"] = CALC + "\n\ndef sub(a, b):\n    return a - b\n"
    env = tasks.make_env(example, limits=FAST)
    assert repair(patch("    return a - b", "    return a + b"), env)[0] == ([], True, 0.0)
    assert "found 2 times" in env.outcome


def test_unclosed_thinking_ends_the_repair_with_0():
    env = tasks.make_env(swe_example(), limits=FAST)
    assert env.step("<think>\n" + patch("    return a - b", "    return a + b")) == ([], True, 0.0)


def hostile(code):
    """A patch that puts `code` in front of the (still buggy) function."""
    return patch("def add(a, b):", code + "\n\n\ndef add(a, b):")


@pytest.mark.parametrize("code", [
    "import sys\nsys.exit(0)",                                      # exit before the tests
    "import os\nos._exit(0)",
    "import os\nos.remove('test_calc.py')",                         # delete the tests
    "import builtins\nbuiltins.print = lambda *a, **k: None",       # silence print
    "import os, json\nfor n in ('test_add_1', 'test_add_2'):\n    for v in range(10):\n"   # forge result lines
    "        os.write(1, ('@@result ' + json.dumps(['test_calc', n, 'ok', str(v)]) + '\\n').encode())\nos._exit(0)",
    "class Anything:\n    def __eq__(self, other):\n        return True\n\n\n"                 # always equal
    "def sub(a, b):\n    return Anything()",
])
def test_hostile_patches_earn_0(code):
    response = hostile(code)
    if "Anything" in code:
        response = patch("def add(a, b):\n    return a - b", code + "\n\n\ndef add(a, b):\n    return sub(a, b)")
    (observations, done, reward), env = repair(response)
    assert reward == 0.0 and not done and "tests fail" in observations[0]["content"], env.outcome


def test_writes_outside_the_scratch_directory_fail():
    features = tasks.sandbox._probe_features()
    if not (features["uid_per_run"] or features["landlock_abi"]):
        pytest.skip("neither a per-run uid nor Landlock on this machine: the sandbox cannot stop these writes")
    name = f"nanocascade_hacked_{uuid.uuid4().hex[:8]}"
    targets = [ROOT / name, Path.home() / name]
    code = "import os\nfor _p in " + repr([str(t) for t in targets]) + (
        ":\n    try:\n        open(_p, 'w').write('x')\n    except OSError:\n        pass")
    try:
        (observations, done, reward), env = repair(patch("    return a - b", "    return a + b") + hostile(code))
        assert (done, reward) == (True, 1.0), env.outcome  # the fix passes; the writes failed quietly
        assert not any(t.exists() for t in targets)
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_an_infinite_loop_ends_by_the_time_limit_with_0():
    (observations, done, reward), env = repair(hostile("while True:\n    pass"))
    assert reward == 0.0 and not done
    assert "the run ended" in observations[0]["content"] and "no result" in observations[0]["content"]


def test_episodes_step_in_parallel_threads():
    good, bad = patch("    return a - b", "    return a + b"), patch("    return a - b", "    return a * b")
    envs = [tasks.make_env(swe_example(), limits=FAST) for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: envs[i].step(THINK + (good if i % 2 else bad)), range(6)))
    assert [r[2] for r in results] == [0.0, 1.0] * 3


# -----------------------------------------------------------------------------
# Validation, the shipped data, the released format

@pytest.mark.parametrize("domain, change, field", [
    ("agent", lambda r: r["state"]["bins"].update({"12": "kiwi"}), "state.bins"),
    ("agent", lambda r: r["state"]["prices"].pop("pear"), "state.prices"),
    ("agent", lambda r: r.update(goal={"answer": 4}), "goal.answer"),
    ("agent", lambda r: r["tools"].append({"type": "function", "function": {"name": "launch"}}), "tools[2]"),
    ("agent", lambda r: r.update(max_turns=0), "max_turns"),
    ("swe", lambda r: r["tests"][0].update(file="missing.py"), "tests[0].file"),
    ("swe", lambda r: r["files"].update({"../escape.py": ""}), "files"),
    ("swe", lambda r: r["files"].update({"json.py": ""}), "files"),
    ("swe", lambda r: r["tests"].append(dict(r["tests"][0])), "tests[2]"),
])
def test_a_malformed_row_names_the_file_line_and_field(tmp_path, domain, change, field):
    good = agent_example({"answer": "4"}, tools=("bin_item", "price")) if domain == "agent" else swe_example()
    bad = json.loads(json.dumps(good))
    change(bad)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(tasks.ExampleError) as error:
        tasks.load_examples(str(path))
    assert error.value.where == f"{path}:2" and error.value.field == field


def replay(example):
    """Play an SFT row's assistant turns through its environment; each observation must equal the row's next
    tool messages. Returns the reward."""
    from tokenizer import render_chat
    env = tasks.make_env(example)
    messages = env.reset()
    rest = example["messages"][len(messages):]
    for i, message in enumerate(rest):
        if message["role"] != "assistant":
            continue
        history = messages + rest[:i + 1]
        full = render_chat(history, tools=example.get("tools"))
        prompt = render_chat(history[:-1], tools=example.get("tools"), add_generation_prompt=True)
        observations, done, reward = env.step("<think>\n" + full[len(prompt):].removesuffix("<|im_end|>\n"))
        following = [m for m in rest[i + 1:i + 1 + len(observations)]]
        assert done == (i == len(rest) - 1) and observations == following, (example, i, observations)
    return reward


@pytest.fixture(scope="module")
def shipped():
    return {split: tasks.load_examples("tiny", split, domains=tasks.ENV_DOMAINS) for split in ("sft", "rl", "eval")}


@pytest.mark.parametrize("domain, sample", [("agent", 100), ("swe", 40)])
def test_shipped_sft_conversations_replay_to_1_except_the_teachers_slips(shipped, domain, sample):
    rows = [e for e in shipped["sft"] if e["domain"] == domain]
    assert len(rows) >= 300
    slipped = [e for e in rows if "teacher_slip" in e]
    assert 0.1 < len(slipped) / len(rows) < 0.5
    rng = random.Random(0)
    picked = rng.sample([e for e in rows if "teacher_slip" not in e], sample - 10) + rng.sample(slipped, 10)
    with ThreadPoolExecutor(4) as pool:
        rewards = list(pool.map(replay, picked))
    assert rewards == [0.0 if "teacher_slip" in e else 1.0 for e in picked]
    if domain == "swe":  # some conversations go on after a test report
        assert any(m["role"] == "tool" for e in rows for m in e["messages"])
    for split in ("rl", "eval"):
        prompts = [e for e in shipped[split] if e["domain"] == domain]
        assert prompts and all(e["messages"][-1]["role"] == "user" for e in prompts)


def test_a_released_swe_rl_row_is_skipped_with_its_reason():
    row = {"responses_create_params": {"input": [], "metadata": {
               "instance_id": "getmoto__moto-5752", "base_commit": "b2300f1eae1323e3e8bc45f97e530ce129dff12e",
               "dataset_name": "SWE-Gym/SWE-Gym", "split": "train", "problem_statement": "Fix the thing.",
               "instance_dict": json.dumps({"repo": "getmoto/moto", "FAIL_TO_PASS": ["tests/test_x.py::t"],
                                            "PASS_TO_PASS": [], "patch": "diff --git ..."})}},
           "agent_ref": {"type": "responses_api_agents", "name": "swe_agents"}}
    reason = tasks.example_from_row(row, "r")
    assert isinstance(reason, str) and reason.startswith("SWE-RL row") and "repository" in reason
    del row["responses_create_params"]["metadata"]["instance_dict"]  # an instance without its dict: the same
    assert tasks.example_from_row(row, "r") == reason
    row["agent_ref"]["name"] = "mcqa"                                   # an instance id alone is not SWE
    del row["responses_create_params"]["metadata"]["base_commit"]
    del row["responses_create_params"]["metadata"]["problem_statement"]
    assert tasks.example_from_row(row, "r") == "no verifier for agent 'mcqa'"
