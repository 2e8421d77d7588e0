"""
The swe domain: repair a tiny Python project so that its tests pass, by patches, over a few turns.

    {"domain": "swe",
     "messages": [{"role": "user", "content": "Fix the bug: add(2, 3) should be 5.\\n\\ncalc.py:\\n..."}],
     "files": {"calc.py": "def add(a, b):\\n    return a - b\\n",
               "test_calc.py": "from calc import add\\n\\n\\ndef test_add():\\n    print(add(2, 3))\\n"},
     "tests": [{"file": "test_calc.py", "name": "test_add", "output": "5\\n"}, ...]}
     (optional "max_turns": assistant turns per episode, default 3)

`files` is the whole project (flat: names like calc.py; the prompt shows them), `tests` the test functions to
run, each with what it must print. A test file is a file that holds a test; the patch may not touch one.

The patch: the text after </think> holds one or more blocks, each

    <<<<<<< SEARCH calc.py
        return a - b
    =======
        return a + b
    >>>>>>> REPLACE

The marker lines are exactly these (the SEARCH line names a file of the project). The lines between the SEARCH
line and "=======" must occur exactly once in the file, as whole lines; they are replaced by the lines between
"=======" and ">>>>>>> REPLACE" (none: a deletion). Blocks apply in order, each to the text the one before left;
text outside the blocks is ignored. Malformed (no block, a block not closed, a stray marker, an empty SEARCH, an
unknown file, SEARCH text found 0 or 2+ times) ends the episode with reward 0, and so does a block on a test file.

A patch that applies is tested: one program, run in the code sandbox (tasks.sandbox.run_program), writes the
project's files into its fresh working directory, runs each test function with its stdout captured and prints one
result line per test. The expected outputs stay in this process and are compared here, test by test, as the
code domain does: a project that exits early, tampers with print or with the runner, or hacks __eq__ prints no
result or a wrong one, and earns 0. Every test passes (and the program exits 0): done, reward 1. Otherwise the
episode goes on with a short test report as a "tool" observation ("2 of 3 tests fail:", then one line per failing
test: got vs expected, or the error's last line); the next patch applies on top of the files as they are now.
"""

import collections
import json
import re
import sys

from .code import normalise_output
from .core import ExampleError, final_answer
from .env import Environment, check_max_turns
from .sandbox import run_program

_FILE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.py")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SEARCH_LINE = re.compile(r"<<<<<<< SEARCH[ \t]+(\S+)")
_DIVIDER, _REPLACE_LINE = "=======", ">>>>>>> REPLACE"
_RESULT = "@@result "
REPORT_LINES = 3   # failing tests listed in a report (the tiny context)


# -----------------------------------------------------------------------------
# Validation

def check(example: dict, where: str):
    files = example.get("files")
    if not isinstance(files, dict) or not files or len(files) > 8:
        raise ExampleError(where, "files", f"expected {{name.py: text}} with 1 to 8 files, got {files!r:.80}")
    for name, text in files.items():
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name[:-3] in _RESERVED:
            raise ExampleError(where, "files", f"{name!r:.40} is not a plain module file name (like calc.py; not "
                               f"main.py nor a standard-library module's)")
        if not isinstance(text, str) or len(text) > 20000:
            raise ExampleError(where, f"files[{name!r}]", "expected the file's text (a string under 20000 characters)")
    example["files"] = {name: text if text.endswith("\n") or not text else text + "\n" for name, text in files.items()}
    tests = example.get("tests")
    if not isinstance(tests, list) or not tests or len(tests) > 32:
        raise ExampleError(where, "tests", f"expected 1 to 32 tests {{file, name, output}}, got {tests!r:.80}")
    seen = set()
    for i, test in enumerate(tests):
        if not isinstance(test, dict) or set(test) != {"file", "name", "output"}:
            raise ExampleError(where, f"tests[{i}]", f"expected {{\"file\", \"name\", \"output\"}}, got {test!r:.80}")
        if test["file"] not in files:
            raise ExampleError(where, f"tests[{i}].file", f"{test['file']!r:.40} is not one of the files")
        if not isinstance(test["name"], str) or not _IDENTIFIER.fullmatch(test["name"]):
            raise ExampleError(where, f"tests[{i}].name", f"expected a function name, got {test['name']!r:.40}")
        if not isinstance(test["output"], str):
            raise ExampleError(where, f"tests[{i}].output", "expected the text the test prints")
        if (test["file"], test["name"]) in seen:
            raise ExampleError(where, f"tests[{i}]", f"{test['file']}::{test['name']} is listed twice")
        seen.add((test["file"], test["name"]))
    check_max_turns(example, where)


_RESERVED = {"main"} | set(getattr(sys, "stdlib_module_names", ()))  # the runner is main.py and imports stdlib


def reward(example: dict, answer: str, **_) -> float:
    raise ValueError("the swe domain is graded by its environment (tasks.make_env(example): reset, then step each "
                     "assistant turn, whose patch is tested in the sandbox): a single answer cannot be graded")


def protected_files(example: dict) -> set:
    return {t["file"] for t in example["tests"]}


# -----------------------------------------------------------------------------
# Patches

class PatchError(ValueError):
    """A patch that cannot be applied: the reason."""


def parse_patch(text: str) -> list[tuple[str, str, str]]:
    """The (file, search, replace) blocks of a patch (format in the module docstring); PatchError if malformed.
    search and replace are whole lines, each ending in a newline."""
    blocks, block, part = [], None, None
    for line in text.split("\n"):
        marker = line.rstrip()
        header = _SEARCH_LINE.fullmatch(marker)
        if block is None:
            if header:
                block, part = [header.group(1), [], []], 1
            elif marker.startswith(("<<<<<<<", ">>>>>>>")) or marker == _DIVIDER:
                raise PatchError(f"a stray marker line: {marker[:40]!r}")
        elif header or marker.startswith("<<<<<<<"):
            raise PatchError("a SEARCH line inside a block")
        elif marker == _DIVIDER:
            if part != 1:
                raise PatchError("a second ======= in a block")
            part = 2
        elif marker == _REPLACE_LINE:
            if part != 2:
                raise PatchError(">>>>>>> REPLACE before =======")
            blocks.append((block[0], "".join(s + "\n" for s in block[1]), "".join(s + "\n" for s in block[2])))
            block = None
        elif marker.startswith(">>>>>>>"):
            raise PatchError(f"a malformed marker line: {marker[:40]!r}")
        else:
            block[part].append(line)
    if block is not None:
        raise PatchError("a block is not closed with >>>>>>> REPLACE")
    if not blocks:
        raise PatchError("no SEARCH/REPLACE block")
    return blocks


def apply_patch(files: dict, text: str, protected=()) -> dict:
    """files (name -> text) with the patch applied, a new dict; PatchError if it is malformed, does not apply, or
    touches a file in `protected` (the test files)."""
    files = dict(files)
    for name, search, replace in parse_patch(text):
        if name not in files:
            raise PatchError(f"no file named {name[:40]}")
        if name in protected:
            raise PatchError(f"the patch edits the test file {name}")
        if not search.strip():
            raise PatchError(f"an empty SEARCH for {name}")
        count = ("\n" + files[name]).count("\n" + search)
        if count != 1:
            raise PatchError(f"the SEARCH text is found {count} times in {name}, not once")
        files[name] = ("\n" + files[name]).replace("\n" + search, "\n" + replace, 1)[1:]
    return files


# -----------------------------------------------------------------------------
# Tests, in the sandbox

# The program run in the sandbox: writes the files, then runs each test with its stdout captured, and writes one
# result line per test through the os.write it saved before any project code ran. It holds no expected output.
_RUNNER = """\
import importlib, importlib.util, io, json, os, sys
_write, _dumps, _stdout = os.write, json.dumps, sys.stdout
for _name, _text in {files!r}.items():
    with open(_name, "w", encoding="utf-8") as _f:
        _f.write(_text)


class _Here:
    # imports the project's modules from the working directory by relative path: the directory above it is not
    # the sandbox user's, so the path finder, which looks the directory up by its absolute path, cannot
    def find_spec(self, name, path=None, target=None):
        if "." in name or not os.path.isfile(name + ".py"):
            return None
        return importlib.util.spec_from_loader(name, self, origin=name + ".py")

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        with open(module.__name__ + ".py", encoding="utf-8") as f:
            module.__file__ = f.name
            exec(compile(f.read(), f.name, "exec"), module.__dict__)


sys.meta_path.insert(0, _Here())
for _module, _test in {tests!r}:
    _buffer = io.StringIO()
    sys.stdout = _buffer
    try:
        getattr(importlib.import_module(_module), _test)()
        _result = ["ok", _buffer.getvalue()]
    except BaseException as _e:
        _result = ["error", type(_e).__name__ + ": " + str(_e)]
    sys.stdout = _stdout
    _write(1, ({result!r} + _dumps([_module, _test] + _result) + "\\n").encode())
"""


def runner_program(files: dict, tests: list) -> str:
    """The sandbox program that runs `tests` on `files` (what run_tests runs)."""
    return _RUNNER.format(files=dict(files), tests=[(t["file"][:-3], t["name"]) for t in tests], result=_RESULT)


def run_tests(files: dict, tests: list, limits=None) -> tuple[bool, str]:
    """(every test passed, a short report of the failures) for the project `files`, run in the sandbox."""
    run = run_program(runner_program(files, tests), "", limits)
    results = collections.defaultdict(list)
    for line in run.stdout.splitlines():
        if line.startswith(_RESULT):
            try:
                module, name, status, text = json.loads(line[len(_RESULT):])
            except (ValueError, TypeError):
                continue
            results[module, name].append((status, text))
    failures = []
    for test in tests:
        got = results.get((test["file"][:-3], test["name"]), [])
        if len(got) != 1:  # none: the run stopped before it; two or more: something printed result lines
            failures.append(f"{test['name']}: no result" if not got else f"{test['name']}: {len(got)} results")
        elif got[0][0] != "ok" or not isinstance(got[0][1], str):
            failures.append(f"{test['name']}: {_last_line(got[0][1])}")
        elif normalise_output(got[0][1]) != normalise_output(test["output"]):
            failures.append(f"{test['name']}: got {_short(got[0][1])}, expected {_short(test['output'])}")
    if not failures and run.status == "ok":
        return True, ""
    stopped = ""
    if run.status != "ok":
        stopped = f" (the run ended: {run.status}{'' if run.status == 'timeout' else ' ' + str(run.exit_code)})"
    lines = [f"{len(failures)} of {len(tests)} tests fail{stopped}:"] + failures[:REPORT_LINES]
    if len(failures) > REPORT_LINES:
        lines.append(f"... {len(failures) - REPORT_LINES} more")
    return False, "\n".join(lines)


def _short(text) -> str:
    text = " ".join(str(text).split()) or "nothing"
    return text if len(text) <= 30 else text[:27] + "..."


def _last_line(text) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()] or ["error"]
    return lines[-1].strip()[:70]


# -----------------------------------------------------------------------------
# The environment

class SweEnvironment(Environment):
    """One repair episode: the project's files, patched turn by turn. `limits`: the sandbox's SandboxLimits."""

    max_turns = 3

    def __init__(self, example: dict, limits=None):
        super().__init__(example)
        self.limits = limits
        self.outcome = ""  # why the last step ended as it did (for tests and debugging)

    def _reset(self):
        self.files = dict(self.example["files"])
        self.outcome = ""

    def _step(self, response: str):
        answer = final_answer(response, thinking=True)
        if answer is None:
            self.outcome = "the thinking never closed"
            return [], True, 0.0
        try:
            self.files = apply_patch(self.files, answer, protected=protected_files(self.example))
        except PatchError as e:
            self.outcome = f"malformed patch: {e}"
            return [], True, 0.0
        passed, report = run_tests(self.files, self.example["tests"], self.limits)
        self.outcome = "every test passes" if passed else report
        return ([], True, 1.0) if passed else ([report], False, 0.0)
