"""
python -m tasks check FILE [SPLIT [CONFIG]]   load (validating every row) and count the examples per domain
python -m tasks sandbox                       which sandbox layers this machine allows, and one test run
"""

import collections
import sys

from . import load_examples
from .math import _math_worker_main
from .sandbox import _launcher_main, _probe_features, _sandbox_python, run_program

if sys.argv[1:] == ["_math_worker"]:  # the math verifier's worker process (tasks/math.py)
    _math_worker_main()
elif sys.argv[1:] == ["_sandbox_launcher"]:  # starts the sandbox's confined runs (tasks/sandbox.py)
    _launcher_main()
elif sys.argv[1:2] == ["check"] and len(sys.argv) > 2:
    loaded = load_examples(sys.argv[2], *(sys.argv[3:4] or [None]), config=(sys.argv[4:5] or [None])[0])
    counts = collections.Counter(e["domain"] for e in loaded)
    print(dict(counts))
    from . import GRADED_DOMAINS
    ungraded = sorted(set(counts) - set(GRADED_DOMAINS))
    if ungraded:  # fine for SFT; evaluation and RL need a verifier
        print(f"no verifier for {ungraded}: these rows can train SFT but cannot be scored or used for RL "
              f"(graded domains: {', '.join(GRADED_DOMAINS)})")
elif sys.argv[1:] == ["sandbox"]:
    result = run_program("print(input()[::-1])", "olleh\n")
    print(f"sandbox layers: {_probe_features()}; python: {_sandbox_python()}; "
          f"test run: {result.status} {result.stdout!r}")
else:
    print("usage: python -m tasks check FILE [SPLIT [CONFIG]]  |  python -m tasks sandbox")
