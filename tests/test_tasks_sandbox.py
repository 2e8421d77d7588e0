"""The code sandbox and the code verifier: every attack scores 0 within its limits and leaves nothing behind.

Where an attack only fails because of the sandbox (secrets in the environment, the network, files outside the
temp dir), a control runs the same program without the sandbox and shows it would have scored 1."""

import dataclasses
import glob
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import tasks

LIMITS = tasks.SandboxLimits(wall_s=2.0, cpu_s=1, memory_mb=256, nproc=16, output_bytes=1 << 20)
TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}, {"input": "0 0\n", "output": "0\n"}]
SUM = "a, b = map(int, input().split())\nprint(a + b)"


def fenced(program: str) -> str:
    return f"<think>\nplan\n</think>\nHere it is:\n```python\n{program}\n```"


def unsandboxed_reward(program: str, tests) -> float:
    """The control: the same grading with a plain subprocess, no confinement."""
    for t in tests:
        out = subprocess.run([sys.executable, "-c", program], input=t["input"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0 or tasks.normalise_output(out.stdout) != tasks.normalise_output(t["output"]):
            return 0.0
    return 1.0


def sandbox_dirs():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "nanocascade-sandbox-*")))


def live_sandbox_processes():
    return {uid: tasks.sandbox._pids_of_uid(uid, live_only=True)
            for uid in range(tasks.sandbox._UID_BASE, tasks.sandbox._UID_BASE + tasks.sandbox._UID_SLOTS)
            if tasks.sandbox._pids_of_uid(uid, live_only=True)}


@pytest.fixture
def clean_machine():
    """Asserts after the test that no sandbox process is alive and no sandbox temp dir is left."""
    before = sandbox_dirs()
    yield
    assert live_sandbox_processes() == {}
    assert sandbox_dirs() - before == set()


def graded(program, tests=TESTS, limits=LIMITS, budget=None):
    start = time.monotonic()
    score = tasks.reward({"domain": "code", "messages": [], "tests": tests}, fenced(program), limits=limits)
    elapsed = time.monotonic() - start
    budget = budget if budget is not None else len(tests) * (limits.wall_s + 1.0)
    assert elapsed < budget, f"took {elapsed:.1f}s, over its {budget:.1f}s budget"
    return score


def test_a_correct_program_scores_1(clean_machine):
    assert graded(SUM) == 1.0


def test_output_compare_is_whitespace_normalised_line_by_line(clean_machine):
    assert graded("a, b = map(int, input().split())\nprint('  ', a + b, '  ')\nprint()") == 1.0
    assert graded("a, b = map(int, input().split())\nprint(a + b, end='')") == 1.0
    assert graded("a, b = map(int, input().split())\nprint(a + b); print(a + b)") == 0.0


def test_no_code_block_or_unclosed_thinking_scores_0():
    example = {"domain": "code", "messages": [], "tests": TESTS}
    assert tasks.reward(example, SUM) == 0.0  # no fence
    assert tasks.reward(example, "<think>\n" + fenced(SUM).split("</think>")[1]) == 0.0  # thinking never closed
    assert tasks.reward(example, f"```python\n{SUM}\n```") == 1.0  # no <think> at all: graded whole


def test_last_code_block_is_the_one_run(clean_machine):
    answer = f"```python\nprint(0)\n```\nbetter:\n```py\n{SUM}\n```"
    assert tasks.reward({"domain": "code", "messages": [], "tests": TESTS}, answer, limits=LIMITS) == 1.0


def test_hard_coded_sample_output_fails_on_the_other_tests(clean_machine):
    assert graded("print(3)") == 0.0


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"])
def test_exiting_before_printing_scores_0(clean_machine, exit_call):
    assert graded(exit_call + "\n" + SUM) == 0.0


def test_crashing_after_printing_scores_0(clean_machine):
    assert graded(SUM + "\nraise ValueError('late')") == 0.0


def test_infinite_loop_is_stopped_by_the_cpu_limit(clean_machine):
    # a wall clock with room to spare: on a loaded machine (other jobs on both cores) the loop gets a small share
    # of a core, and it is the CPU limit that must stop it
    result = tasks.run_program("while True: pass", "", dataclasses.replace(LIMITS, wall_s=30.0))
    assert result.status == "signal" and result.wall_s < 30.0
    assert graded("while True: pass", budget=LIMITS.wall_s + 1.5) == 0.0


def test_sleeping_forever_is_stopped_by_the_wall_clock(clean_machine):
    result = tasks.run_program("import time\ntime.sleep(60)", "", LIMITS)
    assert result.status == "timeout" and result.wall_s < LIMITS.wall_s + 1


@pytest.mark.skipif(os.geteuid() != 0, reason="RLIMIT_NPROC per run needs the per-run uid, which needs root")
def test_fork_bomb_is_held_by_nproc_and_killed(clean_machine):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = tasks.run_program(bomb, "", LIMITS)
    assert result.status in ("timeout", "signal") and result.wall_s < LIMITS.wall_s + 2
    # the limit held: a program that counts how many children it can start gets at most nproc - 1
    counter = ("import os, time\nn = 0\ntry:\n    while n < 1000:\n        if os.fork() == 0:\n"
               "            time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)")
    started = int(tasks.run_program(counter, "", LIMITS).stdout)
    assert started <= LIMITS.nproc - 1


def test_memory_hog_fails_at_the_memory_limit(clean_machine):
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))"
    result = tasks.run_program(hog, "", LIMITS)
    assert result.status in ("exit", "signal") and "MemoryError" in result.stderr
    assert graded(hog + "\n" + SUM, budget=10) == 0.0


def test_a_1gb_print_is_cut_at_the_output_cap(clean_machine):
    flood = "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * (1 << 20))"
    result = tasks.run_program(flood, "", LIMITS)
    assert result.status == "exit" and len(result.stdout) <= LIMITS.output_bytes
    stubborn = ("import sys\nwhile True:\n    try:\n        sys.stdout.write('x' * (1 << 20)); sys.stdout.flush()\n"
                "    except OSError:\n        pass")
    result = tasks.run_program(stubborn, "", LIMITS)
    assert result.status in ("signal", "timeout") and len(result.stdout) <= LIMITS.output_bytes


@pytest.fixture
def open_dir():
    """A world-writable, world-readable directory outside the sandbox."""
    path = tempfile.mkdtemp(prefix="nanocascade-test-outside-")
    os.chmod(path, 0o777)
    yield path
    subprocess.run(["rm", "-rf", path])


@pytest.mark.skipif(not tasks.sandbox._probe_features()["landlock_abi"], reason="needs Landlock")
def test_writing_outside_the_temp_dir_is_denied(clean_machine, open_dir):
    target = os.path.join(open_dir, "planted.txt")
    program = f"open({target!r}, 'w').write('x')\n" + SUM
    assert unsandboxed_reward(program, TESTS[:1]) == 1.0 and os.path.exists(target)  # control
    os.remove(target)
    assert graded(program) == 0.0
    assert not os.path.exists(target)


@pytest.mark.skipif(not tasks.sandbox._probe_features()["landlock_abi"], reason="needs Landlock")
def test_reading_files_outside_is_denied(clean_machine, open_dir):
    leaked = os.path.join(open_dir, "expected.txt")
    with open(leaked, "w") as f:
        f.write("3\n")
    os.chmod(leaked, 0o644)
    program = f"print(open({leaked!r}).read())"
    assert unsandboxed_reward(program, TESTS[:1]) == 1.0  # control: the file is readable to anyone else
    assert graded(program, TESTS[:1]) == 0.0
    assert graded(f"print(open({tasks.__file__!r}).read()[:3])", [{"input": "", "output": '"""'}]) == 0.0


def test_secrets_in_the_environment_do_not_reach_the_program(clean_machine, monkeypatch):
    monkeypatch.setenv("NANOCASCADE_TEST_SECRET", "3")
    program = "import os\nprint(os.environ.get('NANOCASCADE_TEST_SECRET'))"
    assert unsandboxed_reward(program, TESTS[:1]) == 1.0  # control
    assert graded(program, TESTS[:1]) == 0.0
    env = tasks.run_program("import os\nprint(sorted(os.environ))", "", LIMITS).stdout
    assert eval(env) == ["HOME", "LANG", "PATH", "TMPDIR"]


@pytest.fixture
def answer_server():
    """A TCP server on 127.0.0.1 that hands out the expected answer to whoever connects."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(5)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"3\n")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def test_the_network_is_cut(clean_machine, answer_server):
    program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {answer_server}), timeout=2)\n"
               "print(s.recv(100).decode())")
    assert unsandboxed_reward(program, TESTS[:1]) == 1.0  # control: the answer is one connection away
    assert graded(program, TESTS[:1]) == 0.0
    # past the audit hook, straight through libc: the network namespace (or Landlock) still stops it
    raw = ("import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
           f"addr = struct.pack('!HH4s8x', 2, {answer_server}, bytes([127, 0, 0, 1]))\n"
           "addr = struct.pack('=H', 2) + addr[2:]\n"
           "print('connected' if libc.connect(fd, addr, 16) == 0 else 'refused')")
    if tasks.sandbox._probe_features()["network_namespace"] or tasks.sandbox._probe_features()["landlock_abi"] >= 4:
        assert tasks.run_program(raw, "", LIMITS).stdout.strip() == "refused"


@pytest.mark.skipif(os.geteuid() != 0, reason="the per-run uid needs root")
def test_the_program_runs_as_a_throwaway_uid_and_cannot_signal_the_parent(clean_machine):
    uid = int(tasks.run_program("import os\nprint(os.getuid())", "", LIMITS).stdout)
    assert tasks.sandbox._UID_BASE <= uid < tasks.sandbox._UID_BASE + tasks.sandbox._UID_SLOTS
    result = tasks.run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "", LIMITS)
    assert result.status == "exit" and "PermissionError" in result.stderr


def test_a_daemon_that_escapes_the_process_group_is_killed(clean_machine):
    daemon = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n" + SUM
    if os.geteuid() == 0:  # only root's uid sweep reaches a process in a session of its own
        assert graded(daemon) == 1.0  # it did its job; the fixture checks that the daemon is gone


def test_many_programs_grade_in_parallel(clean_machine):
    jobs = [(SUM, t["input"]) for t in TESTS] * 4
    results = tasks.run_programs(jobs, LIMITS, workers=2)
    assert [r.stdout for r in results] == [t["output"] for t in TESTS] * 4


def test_runs_are_started_by_a_reused_launcher_not_the_caller(clean_machine):
    # the caller never forks (a fork copies the caller's page tables: ~50 ms per GB resident); the launcher is
    # kept between runs, and one that died is replaced on the next run
    parent = lambda: int(tasks.run_program("import os\nprint(os.getppid())", "", LIMITS).stdout)
    first = parent()
    assert first != os.getpid() and parent() == first
    tasks.sandbox._launchers.stop()                                  # kills the idle launcher
    assert parent() not in (first, os.getpid())
