"""
The tasks: what an example is, where examples come from, and how a response is graded.

    load_examples(...)        shipped JSONL, any local JSONL / parquet, or the Nemotron-Cascade-2 HF releases
    reward(example, response) a float in [0, 1]: the text after </think> graded by the example's domain
    score_responses(...)      per-domain pass@1 / avg@K / pass@K over many responses, graded in parallel
    run_program(...)          the code sandbox: one untrusted program, one stdin, in a confined process

One example is one JSON object (DESIGN.md section 8). `messages` is the conversation in chat form; for SFT it
ends with the assistant's answer, for RL and evaluation it ends with the user's turn (or a tool result). The other
fields are what the domain's verifier needs, about the last assistant turn:

    {"domain": "math", "messages": [...], "answer": "42"}
    {"domain": "if",   "messages": [...], "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    {"domain": "mcqa", "messages": [...], "answer": "C", "options": [{"A": "..."}, {"B": "..."}, ...]}
    {"domain": "json", "messages": [...], "schema": {...JSON Schema...}}
    {"domain": "code", "messages": [...], "tests": [{"input": "1 2\\n", "output": "3\\n"}, ...]}
    {"domain": "tool", "messages": [...], "tools": [...function specs...], "tool_calls": [[{"name", "arguments"}]]}
    {"domain": "chat", "messages": [...], "topic": ["cats", "my cat"], "format": "list"}   (hidden criteria)
    {"domain": "longctx", "messages": [...], "answer": "8"}

Rows of any other domain (e.g. "sft/chat" from the SFT release) load fine for SFT but have no verifier.

One file per idea: core.py (schema, loaders, final answer, reward dispatch, scoring), one file per domain's
verifier (math.py, ifeval.py, mcqa.py, json.py, code.py, tools.py, chat.py, longctx.py), and sandbox.py (the code
sandbox). A domain module has `check(example, where)` (validate its fields, raise ExampleError) and
`reward(example, answer, **options)` (grade the final answer); VERIFIERS below is the one place that maps a
domain name to its module.
Only the standard library is imported at the top of every file: `datasets`, `jsonschema`, `langdetect`,
`math_verify` and the tokenizer are imported where they are used, so `import tasks` is cheap (and the math worker
and the sandbox start fast).
"""

from . import agent, chat, code, ifeval, json, longctx, math, mcqa, swe, tools
from .agent import AgentEnvironment
from .code import code_reward, extract_code, normalise_output
from .core import (DATA_DIR, ROLES, ExampleError, example_from_row, final_answer, format_score_table,
                   load_examples, prompt_messages, reward, score_responses, summarise_rewards)
from .env import Environment, make_env
from .ifeval import INSTRUCTIONS, check_instruction, if_reward
from .json import json_reward, strict_schema
from .longctx import longctx_reward, normalise_answer
from .math import last_boxed, math_reward
from .mcqa import mcqa_letter, mcqa_reward
from .sandbox import RunResult, SandboxLimits, run_program, run_programs
from .swe import SweEnvironment
from .tools import tool_reward

# domain name -> the module that checks and grades it. Add a domain: write tasks/mine.py, register it here.
VERIFIERS = {"math": math, "if": ifeval, "mcqa": mcqa, "json": json, "code": code, "tool": tools,
             "agent": agent, "swe": swe, "chat": chat, "longctx": longctx}
# the multi-turn domains: domain name -> its Environment (tasks/env.py), which grades a whole episode; their
# modules in VERIFIERS check the rows, and their reward() raises (one answer cannot be graded)
ENVIRONMENTS = {"agent": AgentEnvironment, "swe": SweEnvironment}
ENV_DOMAINS = tuple(ENVIRONMENTS)
GRADED_DOMAINS = tuple(VERIFIERS)   # every domain with a score: reward(example, response), or its environment
