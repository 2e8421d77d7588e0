"""
The code sandbox: run one untrusted program on one stdin in a confined process (threat model below).

    run_program(source, stdin, limits)   -> RunResult(status, exit_code, stdout, stderr, wall_s)
    run_programs([(source, stdin), ...]) the same, a thread pool of them
"""

import ctypes
import fcntl
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .core import WorkerPool, serve_json_lines

# The sandbox
#
# Threat model. The program is untrusted and may be adversarial: RL optimises against the grader, so whatever
# earns 1 without solving the task will be found. It must not (1) earn a reward it did not earn, (2) harm or
# read the machine, the trainer or other sandboxes, (3) outlive its run. Defences, each a kernel mechanism
# rather than something the program could undo from inside Python:
#
#   what it could try                            what stops it
#   ------------------------------------------   -------------------------------------------------------------
#   read the expected output / the test files    the expected output never leaves the parent; Landlock lets
#                                                the child read only the interpreter, system libraries and its
#                                                own temp dir (so not data/eval.jsonl, /root, /proc, /home)
#   sys.exit(0) / os._exit(0) before printing,   the parent compares what was printed, test by test, and needs
#   patch __eq__ / print / the test runner,      exit status 0; there is no runner or checker in the child to
#   hard-code the sample output                  patch, and every test is a fresh process
#   loop forever / sleep forever                 RLIMIT_CPU (then SIGKILL) and a wall-clock timeout
#   allocate memory without end                  RLIMIT_AS
#   fork bomb, threads without end               RLIMIT_NPROC, counted per uid: each concurrent run gets its
#                                                own throwaway uid, so the limit holds as root too (root
#                                                itself ignores RLIMIT_NPROC) and no run starves another
#   print 1 GB, fill the disk                    stdout/stderr go to files capped by RLIMIT_FSIZE (writes past
#                                                it fail); the parent reads at most that many bytes
#   escape the kill with setsid() / a daemon     after each run the parent kills the process group, then every
#                                                process left with the run's uid (kill(-1) as that uid)
#   read secrets from the environment            the environment is replaced: PATH, LANG, HOME, TMPDIR only
#   use the network                              a new, empty network namespace (no interface but a down lo);
#                                                Landlock denies TCP bind/connect; an audit hook in the child
#                                                refuses Python socket creation
#   signal or ptrace the trainer, other runs     a different uid (root's processes are out of reach), Landlock
#                                                scoping of signals and abstract unix sockets, no_new_privs
#
# What needs what. The uid switch (NPROC per run, the kill sweep, no access to root's files) needs root. The
# network namespace needs root or unprivileged user namespaces. Landlock needs Linux >= 5.13 (TCP rules 6.7,
# signal scoping 6.12). run_program uses whatever the machine allows and _probe_features() says what that is;
# where a layer is missing the others still hold, and what is then not cut is: without the uid switch (not
# root) RLIMIT_NPROC counts all of this user's processes, so it is set to their current count plus the limit,
# and a child that calls setsid() escapes the group kill (it still dies at its CPU limit); without a network
# namespace and without Landlock's TCP rules only the audit hook stands between Python code and the network,
# and code that calls the C library directly (ctypes) gets past it; without Landlock the child can read
# world-readable files and write world-writable directories (/tmp). Not defended: kernel exploits, and
# side channels such as timing. `python -m tasks sandbox` prints which layers are on.

@dataclass
class SandboxLimits:
    wall_s: float = 10.0         # wall-clock seconds for the whole run
    cpu_s: int = 4               # CPU seconds per process (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024        # address space per process
    nproc: int = 32              # processes + threads of the run's uid
    output_bytes: int = 1 << 20  # stdout (and any file it writes) capped at this size
    nofile: int = 64             # open file descriptors


@dataclass
class RunResult:
    status: str      # "ok" (exit 0), "exit" (non-zero exit), "signal" (killed: CPU, memory, ...), "timeout"
    exit_code: int   # the return code (negative: the signal number)
    stdout: str      # at most output_bytes of it, decoded as UTF-8 (bad bytes replaced)
    stderr: str      # its last 2000 characters, for debugging
    wall_s: float


# Runs the program with the audit hook installed first. Runs with -I -S: no site-packages, no user paths.
_CHILD_MAIN = """\
import sys
def _no_network(event, args):
    if event.startswith("socket."):
        raise PermissionError("the sandbox has no network")
sys.addaudithook(_no_network)
del _no_network
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as f:
    _source = f.read()
_code = compile(_source, "main.py", "exec")
del f, _source
exec(_code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
"""

_libc = ctypes.CDLL(None, use_errno=True)
_IS_ROOT = os.geteuid() == 0
_UID_BASE, _UID_SLOTS = 1_900_000, 64  # throwaway uids for concurrent runs (no passwd entry needed)
_SLOT_DIR = Path(tempfile.gettempdir()) / "nanocascade-sandbox-uids"
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_PR_SET_NO_NEW_PRIVS = 38


def _sandbox_python() -> str:
    """An interpreter the sandbox uid can run: every directory above it world-searchable (a pyenv under /root,
    mode 700, is not). NANOCASCADE_SANDBOX_PYTHON overrides."""
    if os.environ.get("NANOCASCADE_SANDBOX_PYTHON"):
        return os.environ["NANOCASCADE_SANDBOX_PYTHON"]
    candidates = [getattr(sys, "_base_executable", None), sys.executable, shutil.which("python3"), "/usr/bin/python3",
                  "/usr/local/bin/python3"]
    for candidate in candidates:
        if not candidate or not os.path.exists(candidate):
            continue
        path = os.path.realpath(candidate)
        searchable = all(os.stat(p).st_mode & 0o001 for p in Path(path).parents)
        if not _IS_ROOT or searchable and os.stat(path).st_mode & 0o005 == 0o005:
            return path
    raise RuntimeError("no Python interpreter that other users can run (set NANOCASCADE_SANDBOX_PYTHON)")


# --- Landlock: the child may read/execute the interpreter and system libraries, and write only its own dir ---

_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | (1 << 14) | (1 << 15)  # + truncate, ioctl_dev
_LL_READ_ONLY = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_abi() -> int:
    abi = _libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(abi, 0)


_LANDLOCK_ABI = _landlock_abi() if sys.platform == "linux" else 0


def _landlock_read_paths(python: str) -> list[str]:
    prefix = Path(python).parent.parent
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime", str(prefix)]
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def _landlock_restrict(read_paths, write_dir):
    """Called in the child before exec. Raises OSError if the kernel refuses."""
    abi = _LANDLOCK_ABI
    handled = (1 << 13) - 1                     # ABI 1: execute .. make_sym
    handled |= (1 << 13) if abi >= 2 else 0     # refer
    handled |= (1 << 14) if abi >= 3 else 0     # truncate
    handled |= (1 << 15) if abi >= 5 else 0     # ioctl_dev
    network = 0b11 if abi >= 4 else 0  # TCP bind + connect
    scoped = 0b11 if abi >= 6 else 0   # abstract unix sockets + signals outside the sandbox
    attr = _RulesetAttr(handled, network, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        rules = [(p, _LL_READ_ONLY) for p in read_paths] + [("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE),
                                                            (write_dir, handled)]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not os.path.isdir(path):
                    access &= _LL_FILE_RIGHTS
                rule = _PathBeneathAttr(access & handled, fd)
                if _libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0) < 0:  # LANDLOCK_RULE_PATH_BENEATH
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        if _libc.syscall(446, ruleset, 0) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)


# --- uid slots: a run holds a lock file for its uid, so concurrent runs (any process) never share one ---

def _pids_of_uid(uid: int, live_only=False) -> list[int]:
    """The processes of uid; live_only leaves out zombies (dead, waiting for init to reap them)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                if live_only:
                    with open(f"/proc/{name}/stat") as f:
                        if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                            continue
                pids.append(int(name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return pids


def _kill_uid(uid: int, python: str):
    """SIGKILL every process of uid at once: kill(-1) sent as that uid reaches exactly them, atomically (no
    fork can slip between the scan and the kill)."""
    subprocess.run([python, "-I", "-S", "-c", "import os\ntry: os.kill(-1, 9)\nexcept OSError: pass"],
                   user=uid, group=uid, extra_groups=[], env={}, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def _acquire_uid(python: str):
    """(uid, lock file) for a free slot whose uid has no processes, not even zombies."""
    _SLOT_DIR.mkdir(mode=0o700, exist_ok=True)
    while True:
        for slot in random.sample(range(_UID_SLOTS), _UID_SLOTS):
            uid = _UID_BASE + slot
            lock = open(_SLOT_DIR / f"{uid}.lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            if not _pids_of_uid(uid):
                return uid, lock
            if _pids_of_uid(uid, live_only=True):  # leftovers of a run that died before its cleanup
                _kill_uid(uid, python)
            lock.close()  # zombies count against RLIMIT_NPROC until init reaps them: use another slot
        time.sleep(0.05)


def _confine(uid, limits: SandboxLimits, box: str, python: str, nproc_base: int, features: dict):
    """The child's preexec: network namespace, Landlock, no_new_privs, the uid, then the rlimits (last, because
    RLIMIT_AS may be below what the forked copy of the parent already maps). A layer that the probe found
    working and that now fails raises, so the run fails rather than running less confined."""
    if features["network_namespace"]:
        _unshare_network()
    if sys.platform == "linux" and _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if features["landlock_abi"]:
        _landlock_restrict(_landlock_read_paths(python), box)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    rlimits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, limits.nofile),
               (resource.RLIMIT_FSIZE, limits.output_bytes), (resource.RLIMIT_AS, limits.memory_mb << 20)]
    if nproc_base is not None:  # None: no /proc to count this user's processes with (macOS): no NPROC limit
        rlimits.insert(0, (resource.RLIMIT_NPROC, nproc_base + limits.nproc))
    for which, value in rlimits:
        resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))


def _unshare_network():
    """A new network namespace: root can make one directly, anyone else inside a new user namespace."""
    flags = _CLONE_NEWNET if _IS_ROOT else _CLONE_NEWUSER | _CLONE_NEWNET
    if _libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")


def _probe_features() -> dict:
    """Which layers work here: each is tried once on a child that runs `pass`."""
    python = _sandbox_python()

    def works(preexec) -> bool:
        try:
            return subprocess.run([python, "-I", "-S", "-c", "pass"], preexec_fn=preexec, env={},
                                  capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False
    landlock = _LANDLOCK_ABI > 0 and works(lambda: (_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                                                     _landlock_restrict(_landlock_read_paths(python), "/tmp")))
    return {"uid_per_run": _IS_ROOT, "network_namespace": works(_unshare_network),
            "landlock_abi": _LANDLOCK_ABI if landlock else 0}


SANDBOX_FEATURES = None  # the launcher fills it on first use: which layers this machine allows (threat model)


_launchers = WorkerPool("_sandbox_launcher")


def run_program(source: str, stdin: str, limits: SandboxLimits = None) -> RunResult:
    """
    Run one untrusted Python program on one stdin, confined (see the threat model above). The run is started by
    a small launcher process (`python -m tasks _sandbox_launcher`, one per concurrent caller, kept for the next
    run), not by the caller: the confined child must be forked (its confinement runs between fork and exec), and
    fork copies the page tables of the process that forks, so from a trainer with 3 GB resident a run took 146 ms
    against 13 ms from the launcher. A confinement layer that fails, or a launcher that dies, raises.
    """
    limits = limits or SandboxLimits()
    reply = _launchers.request({"source": source, "stdin": stdin, "limits": asdict(limits)}, limits.wall_s + 60)
    if reply is None:
        raise RuntimeError("the sandbox launcher process died or hung")
    if "error" in reply:
        raise RuntimeError(f"the sandbox could not run the program: {reply['error']}")
    return RunResult(**reply)


def _launcher_main():
    """The launcher's loop (python -m tasks _sandbox_launcher): each request is one _run_here."""
    def handle(request):
        try:
            return asdict(_run_here(request["source"], request["stdin"], SandboxLimits(**request["limits"])))
        except Exception as e:  # a layer that the probe found working failed: the caller raises
            return {"error": f"{type(e).__name__}: {e}"}
    serve_json_lines(handle)


def _run_here(source: str, stdin: str, limits: SandboxLimits) -> RunResult:
    """run_program's work, in this process (the launcher)."""
    global SANDBOX_FEATURES
    if SANDBOX_FEATURES is None:
        SANDBOX_FEATURES = _probe_features()
    python = _sandbox_python()
    uid, lock = _acquire_uid(python) if _IS_ROOT else (None, None)
    workdir = tempfile.mkdtemp(prefix="nanocascade-sandbox-")  # ours (mode 700); the child only gets box/
    box = os.path.join(workdir, "box")
    try:
        os.mkdir(box, 0o700)
        with open(os.path.join(box, "main.py"), "w", encoding="utf-8") as f:
            f.write(source)
        with open(os.path.join(workdir, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        if uid is not None:
            for path in (box, os.path.join(box, "main.py")):
                os.chown(path, uid, uid)
        nproc_base = 0 if uid is not None else len(_pids_of_uid(os.getuid())) if os.path.isdir("/proc") else None
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": box, "TMPDIR": box}
        start = time.monotonic()
        with open(os.path.join(workdir, "stdin"), "rb") as fin, open(os.path.join(workdir, "stdout"), "wb") as fout, \
                open(os.path.join(workdir, "stderr"), "wb") as ferr:
            proc = subprocess.Popen([python, "-I", "-S", "-B", "-c", _CHILD_MAIN], cwd=box, env=env, stdin=fin,
                                    stdout=fout, stderr=ferr, start_new_session=True, close_fds=True,
                                    preexec_fn=lambda: _confine(uid, limits, box, python, nproc_base, SANDBOX_FEATURES))
            try:
                timed_out = not _wait_exit(proc, limits.wall_s)
            finally:
                _kill_run(proc, uid, python)
        wall = time.monotonic() - start
        with open(os.path.join(workdir, "stdout"), "rb") as f:
            stdout = f.read(limits.output_bytes).decode("utf-8", errors="replace")
        with open(os.path.join(workdir, "stderr"), "rb") as f:
            stderr = f.read(limits.output_bytes).decode("utf-8", errors="replace")[-2000:]
        code = proc.returncode
        status = "timeout" if timed_out else "ok" if code == 0 else "signal" if code < 0 else "exit"
        return RunResult(status, code, stdout, stderr, wall)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if lock is not None:
            lock.close()  # releases the slot, now empty of processes


def _wait_exit(proc, timeout) -> bool:
    """Whether the child exited within timeout seconds. On Linux a pidfd (which names exactly this process, never
    a reused pid) wakes us the moment it exits; Popen.wait(timeout) instead polls, sleeping up to 50 ms between
    looks, which doubled the time of a typical 15 ms test run."""
    if hasattr(os, "pidfd_open"):
        fd = os.pidfd_open(proc.pid)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(timeout * 1000):
                return False
        finally:
            os.close(fd)
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _kill_run(proc, uid, python):
    """Kill the run's process group, then (as root) anything else left with its uid, and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is not None and _pids_of_uid(uid, live_only=True):
        _kill_uid(uid, python)


def run_programs(jobs, limits: SandboxLimits = None, workers: int = None) -> list[RunResult]:
    """run_program over (source, stdin) pairs, `workers` at a time (default: one per CPU)."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run_program(job[0], job[1], limits), jobs))


