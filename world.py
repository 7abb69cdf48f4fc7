"""world.py: AppWorld sessions for prost, each task in its own sandboxed worker process.

Where this sits in ProST (progressive sub-task training): every other stage needs a world in which
small planner / executor / critic models act by writing Python against AppWorld's `apis`.
  * agents.py opens a `WorldSession`, shows the model the task, runs the code the model writes, and asks
    AppWorld's own evaluator whether the task was solved.
  * evaluate.py runs whole splits through a `WorldPool` and reports TGC / SGC.
The tasks come from an AppWorld data root: the embedded synthetic mini-world that miniworld.py generates
(the default, `miniworld/`), or AppWorld's own downloaded benchmark when APPWORLD_ROOT points at it.

AppWorld freezes the whole process clock, allows one world per process and times out code with SIGALRM
on the main thread, so worlds run in worker processes. The caller only ever sends code
strings. Agent code is untrusted, so each task gets a fresh process forked from a privileged worker that
never runs agent code (the zygote): the fork opens the task (without its ground truth) and then locks
itself in (an empty chroot, a uid of its own, seccomp, Landlock, resource limits) before it runs any code
in AppWorld's guarded executor. A task is judged by AppWorld's evaluator in another fork of the zygote,
from a checked snapshot of the task's database changes. A hung, dead or misbehaving task process is
killed and the call reported as a failed execution, so the caller never hangs; before the next call a
new process reopens the task and the task's earlier code is replayed to restore its state.

This module never imports torch, and imports appworld only inside worker processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import select
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from store import sampled_sha256  # stdlib-only leaf

REPO = Path(__file__).resolve().parent
DEFAULT_ROOT = REPO / "miniworld"


def world_root() -> Path:
    """The AppWorld root in use: $APPWORLD_ROOT if set, else the mini-world folder."""
    env = os.environ.get("APPWORLD_ROOT")
    return Path(env) if env else DEFAULT_ROOT


# ======================================================================================================
# Reading task data (works on the mini-world and on the real benchmark).
# ======================================================================================================


def _data_dir(root: str | Path | None) -> Path:
    data = Path(root or world_root()) / "data"
    if not data.is_dir():
        raise FileNotFoundError(f"no AppWorld data at {data}: run `python miniworld.py build` or set APPWORLD_ROOT")
    return data


def load_split(split: str, root: str | Path | None = None) -> list[str]:
    """Task ids of a split (datasets/<split>.txt), in file order."""
    path = _data_dir(root) / "datasets" / f"{split}.txt"
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise FileNotFoundError(f"no split {split!r} in {path.parent} (available: {', '.join(choices)})")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def split_fingerprint(split: str, root: str | Path | None = None) -> str:
    """A content fingerprint of what a split's rollouts start from: its task list, the apps' base databases and
    every file of its tasks' folders (store.sampled_sha256). An evaluation's identity records it rather than
    the world's path, so an evaluation resumes after its world moved, and not after the world changed."""
    data = _data_dir(root)
    files = [data / "datasets" / f"{split}.txt", *sorted((data / "base_dbs").glob("*"))]
    for task_id in load_split(split, root):
        files += sorted(p for p in task_dir(task_id, root).rglob("*") if p.is_file())
    return sampled_sha256([p for p in files if p.is_file()])


def scenario_of(task_id: str) -> str:
    """AppWorld's scenario id: the task id before its underscore (a scenario's variants share it)."""
    return task_id.split("_")[0]


def select_tasks(split: str, root: str | Path | None = None, *, scenarios: int | None = None,
                 limit: int | None = None) -> list[str]:
    """A split's task ids in file order: only its first `scenarios` scenarios (all their variants), then
    only the first `limit` of those. Whole scenarios keep SGC meaningful; the mini-world lists dev's
    scenarios in train's order, so `scenarios=N` picks the held-out variants of the N trained on."""
    for flag, value in (("--scenarios", scenarios), ("--limit", limit)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1 (got {value})")
    task_ids = load_split(split, root)
    if scenarios is not None:
        kept = list(dict.fromkeys(scenario_of(t) for t in task_ids))[:scenarios]
        task_ids = [t for t in task_ids if scenario_of(t) in kept]
    task_ids = task_ids[:limit]
    if not task_ids:
        raise ValueError(f"split {split!r} has no tasks")
    return task_ids


def task_dir(task_id: str, root: str | Path | None) -> Path:
    path = _data_dir(root) / "tasks" / task_id
    if not path.is_dir():
        raise FileNotFoundError(f"unknown task {task_id!r}: no folder {path}")
    return path


def task_metadata(task_id: str, root: str | Path | None = None) -> dict:
    """Ground-truth metadata (difficulty, num_apps, num_api_calls, ...) plus the scenario id."""
    path = task_dir(task_id, root) / "ground_truth" / "metadata.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta.setdefault("scenario", task_id.split("_")[0])
    return meta



# ======================================================================================================
# Sessions: each task in its own sandboxed process, forked from a privileged worker (the zygote).
# ======================================================================================================


@dataclass
class TaskInfo:
    task_id: str
    instruction: str
    supervisor: dict
    apps: dict[str, str]  # app name -> description
    datetime: str


@dataclass
class Execution:
    output: str
    error: bool


@dataclass
class Evaluation:
    success: bool
    passes: list[str]
    failures: list[str]
    num_tests: int
    traces: dict[str, str] = field(default_factory=dict)  # failed requirement -> evaluator's trace


FAILED = "Execution failed. Traceback:\n"  # AppWorld's own prefix for failed executions


def truncate(text: str, limit: int) -> str:
    """Keep the head and tail of an over-long output and say how much was cut."""
    if len(text) <= limit:
        return text
    half = max(limit // 2, 1)
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters truncated] ...\n{text[-half:]}"


# -- the sandbox --------------------------------------------------------------------------------------------
# Agent code is untrusted. Each task runs in a fresh process forked from a privileged "zygote" (one per session,
# with appworld imported and warmed up, that never runs agent code). The fork opens the task as root, without its
# ground truth, closes every file it holds, then locks itself in: an empty chroot, a uid of its own that owns no
# file, an empty network namespace, a seccomp filter, Landlock and resource limits. Only then does agent code run.
# Evaluation runs in another fork of the zygote, from a snapshot of the task's database changes that the sandboxed
# process sends back and that the evaluator checks before applying. See README "The sandbox".

SANDBOX_UID_BASE = 2_000_000_000  # a task process runs as uid = gid = base + its pid: unique, owns no file
SANDBOX_MAX_THREADS = 16  # RLIMIT_NPROC of that uid: AppWorld's API client needs a thread per call
SANDBOX_MAX_FILES = 64  # RLIMIT_NOFILE
SANDBOX_CWD = "/prost-sandbox"  # the working directory inside the (empty) chroot
SNAPSHOT_LIMIT = 256 * 2**20  # bytes: a task's database changes, as sent back for evaluation
CHANGE_STATEMENTS = ("INSERT", "UPDATE", "DELETE", "CREATE", "DROP")  # all AppWorld's change tracker records
WARM_UP_MODULES = (  # imported inside functions by Python or AppWorld while serving a task
    "_strptime", "unicodedata", "encodings.idna", "decimal", "unittest.mock", "base64", "pickle", "secrets",
    "zipfile", "difflib", "ast", "logging", "xxhash", "inflection", "pendulum", "fastapi.exceptions",
    "fastapi.params", "cryptography.hazmat.backends", "cryptography.hazmat.primitives.hashes",
    "cryptography.hazmat.primitives.padding", "cryptography.hazmat.primitives.ciphers")
_LANDLOCK_SYSCALLS = (444, 445, 446)  # create_ruleset, add_rule, restrict_self: same on x86_64 and aarch64
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS, _PR_SET_PDEATHSIG = 38, 1


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _landlock(libc) -> int:
    """Forbid this process every file access (and TCP, and signals outside it, where the kernel can); no rules
    are added, so nothing is allowed. Unprivileged and irreversible; files already open stay usable.
    Returns the Landlock ABI version applied, 0 if none."""
    import ctypes
    abi = libc.syscall(_LANDLOCK_SYSCALLS[0], None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # the ABI version
    if abi < 1:
        return 0
    fs = (1 << 13) - 1 | (abi >= 2) << 13 | (abi >= 3) << 14 | (abi >= 5) << 15  # every access right it knows
    fields = [fs] + ([0b11] if abi >= 4 else []) + ([0b11] if abi >= 6 else [])  # TCP bind/connect; scopes
    attr = (ctypes.c_uint64 * len(fields))(*fields)
    ruleset = libc.syscall(_LANDLOCK_SYSCALLS[0], ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    try:
        applied = (libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                   and libc.syscall(_LANDLOCK_SYSCALLS[2], ruleset, ctypes.c_uint32(0)) == 0)
        return abi if applied else 0
    finally:
        os.close(ruleset)


_SECCOMP_ARCHES = {  # machine -> (audit arch, syscall numbers) for the filter below
    "x86_64": (0xC000003E, {"seccomp": 317, "clone": 56, "clone3": 435, "socket": 41, "fork": 57, "vfork": 58,
                            "execve": 59, "execveat": 322}),
    "aarch64": (0xC00000B7, {"seccomp": 277, "clone": 220, "clone3": 435, "socket": 198, "execve": 221,
                             "execveat": 281}),
}


def _seccomp(libc) -> bool:
    """Install a seccomp filter on every thread: no new process (threads only), no program, no socket but Unix
    ones. clone3 answers ENOSYS, so that threads fall back to clone, whose flags a filter can read."""
    import ctypes
    if os.uname().machine not in _SECCOMP_ARCHES:
        return False
    arch, nr = _SECCOMP_ARCHES[os.uname().machine]
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF: load word, jumps (offsets skip), return
    allow, deny, nosys, kill = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000  # EPERM, ENOSYS
    number, arch_word, arg0 = 0, 4, 16  # offsets in struct seccomp_data (arg0's low half, little-endian)
    prog = [(load, 0, 0, arch_word), (jeq, 1, 0, arch), (ret, 0, 0, kill),  # another ABI's numbers
            (load, 0, 0, number), (jge, 0, 1, 0x40000000), (ret, 0, 0, deny)]  # x32 numbers
    for name in ("fork", "vfork", "execve", "execveat"):
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, deny)]
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, nosys),
             (jeq, 0, 4, nr["socket"]), (load, 0, 0, arg0), (jeq, 0, 1, 1), (ret, 0, 0, allow), (ret, 0, 0, deny),
             (jeq, 0, 4, nr["clone"]), (load, 0, 0, arg0), (jset, 0, 1, 0x00010000), (ret, 0, 0, allow),
             (ret, 0, 0, deny),  # clone without CLONE_THREAD
             (ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*instruction) for instruction in prog])
    program = Program(len(prog), filters)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    set_mode_filter, tsync = 1, 1
    return libc.syscall(nr["seccomp"], set_mode_filter, tsync, ctypes.byref(program)) == 0


def _close_databases() -> None:
    """Close AppWorld's cached connections to the base databases: read-write and memory-mapped, they must not
    stay open in a locked-in process. (Asked for by path: the cache hands back what it holds.)"""
    from appworld.apps import get_all_apps
    from appworld.apps.model_lib import db_home_to_app_path, get_db_home_path, get_direct_cached_sqlite3_connection

    base = get_db_home_path(storage_type="disk", type="base")
    held = get_direct_cached_sqlite3_connection.cache_info().currsize
    for app in get_all_apps() if held else []:
        path = db_home_to_app_path(base, app, format="full")
        if os.path.exists(path):
            get_direct_cached_sqlite3_connection(path).close()
    get_direct_cached_sqlite3_connection.cache_clear()


def _close_descriptors(keep: int, files_only: bool) -> None:
    """Close every descriptor above stdio but `keep` (or, files_only, those of files and folders)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == keep:
            continue
        try:
            mode = os.fstat(fd).st_mode
            if not files_only or stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISBLK(mode):
                os.close(fd)
        except OSError:  # the descriptor listdir itself used
            pass


def _set_memory_limit(max_memory_mb: int | None) -> None:
    if not max_memory_mb:
        return
    import resource
    limit = max_memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _lock_in(jail: str, max_memory_mb: int | None) -> list[str]:
    """Drop this (forked, task-holding) process to the sandbox; returns the protections it could not get."""
    import resource
    libc, missing = _libc(), []
    _set_memory_limit(max_memory_mb)
    for limit, value in ((resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_NOFILE, SANDBOX_MAX_FILES),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    root = os.geteuid() == 0
    isolated_network = root and libc.unshare(_CLONE_NEWNET) == 0  # an empty network namespace: CAP_SYS_ADMIN
    if root:
        os.chroot(jail)
        os.chdir(SANDBOX_CWD)  # not "/": AppWorld replaces the working directory by "." in tracebacks
        uid = SANDBOX_UID_BASE + os.getpid()
        resource.setrlimit(resource.RLIMIT_NPROC, (SANDBOX_MAX_THREADS, SANDBOX_MAX_THREADS))
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    else:
        missing.append("a chroot and a uid of its own (needs root)")
    seccomp = _seccomp(libc)
    if not seccomp:
        missing.append("a seccomp filter (needs x86_64 or aarch64 Linux)")
    if not _landlock(libc):
        missing.append("Landlock (needs Linux 5.13+ with Landlock enabled)")
    if not (isolated_network or seccomp):
        missing.append("network isolation")
    if not (root or seccomp):
        missing.append("a stop to new processes")
    libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)  # after setuid, which clears it: die with the zygote
    return missing


class _CappedLog(list):
    """AppWorld's in-memory log of executions (environment_io), each entry capped like the agent's output."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def append(self, entry: dict) -> None:
        super().append({key: truncate(value, self.limit) for key, value in entry.items()})


class _TaskProcess:
    """The sandboxed side: one opened AppWorld task; serves JSON requests {id, command, args} on a channel."""

    def __init__(self, channel, max_output_chars: int):
        self.channel, self.max_output_chars, self.world = channel, max_output_chars, None

    def open(self, task_id: str, timeout: int, outputs: str) -> dict:
        from appworld import AppWorld

        # An absolute experiment name puts AppWorld's output folder outside the world root (os.path.join).
        self.world = AppWorld(task_id=task_id, experiment_name=outputs, timeout_seconds=timeout,
                              load_ground_truth=False)
        shutil.rmtree(outputs, ignore_errors=True)
        # Nothing is written from here on: the state goes back by snapshot(), the log stays in memory, capped.
        self.world.save_logs = lambda: None
        self.world._save_state = lambda directory: None
        self.world.environment_io = _CappedLog(self.max_output_chars)
        task = self.world.task
        return {"task_id": task_id, "instruction": task.instruction,
                "supervisor": {k: task.supervisor[k] for k in ("first_name", "last_name", "email", "phone_number")},
                "apps": dict(task.app_descriptions), "datetime": task.datetime.isoformat()}

    def execute(self, code: str, timeout: int) -> list:
        self.world.timeout_seconds = max(int(timeout), 1)
        output = self.world.execute(code)
        return [truncate(output, self.max_output_chars), output.startswith("Execution failed")]

    def snapshot(self) -> dict[str, str]:
        """The task's database changes in AppWorld's "changes" format, {file name: text}, as `save_state` writes
        them (rebuilt here in memory: this process has nowhere to write)."""
        from appworld.apps.model_lib import ModelHashHandler
        from appworld.common.utils import import_models_module
        apps = dict.fromkeys([*self.world.task.allowed_apps, "admin", "supervisor"])
        files = {f"{app}.jsonl": "".join(json.dumps(change) + "\n"
                                         for change in import_models_module(app).SQLModel.db.tracker.changes)
                 for app in apps}
        files["model_hashes.json"] = json.dumps(ModelHashHandler.data[self.world.models_to_db_home_path])
        return files

    def reply(self, request_id: int, **fields: Any) -> None:
        self.channel.send_bytes(json.dumps({"id": request_id, **fields}).encode())

    def serve(self) -> None:
        while True:
            try:
                request = json.loads(self.channel.recv_bytes())
            except (EOFError, OSError):
                return
            command, args = request["command"], request["args"]
            try:
                self.reply(request["id"], ok=True, result=getattr(self, command)(*args))
            except Exception as error:  # AppWorld itself failed (agent code's errors come back as outputs)
                self.reply(request["id"], ok=False, error=f"{type(error).__name__}: {error}")
            except BaseException as error:  # e.g. KeyboardInterrupt out of agent code: state unknown, so quit
                self.reply(request["id"], ok=True, replace=True,
                           result=[FAILED + f"{type(error).__name__}: {error}", True])
                return


def _task_main(channel, task_id: str, timeout: int, outputs: str, jail: str, max_output_chars: int,
               max_memory_mb: int | None) -> None:
    """Body of a forked task process: open the task with privileges, lock in, serve agent code."""
    task = _TaskProcess(channel, max_output_chars)
    os.setsid()  # its own process group, so a non-root close can still kill what it starts
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # not the caller's terminal or log files
        os.dup2(null, fd)
    _close_descriptors(keep=channel.fileno(), files_only=False)  # all the zygote held, its pipe to the caller too
    try:
        info = task.open(task_id, timeout, outputs)
        _close_databases()
        _close_descriptors(keep=channel.fileno(), files_only=True)
        missing = _lock_in(jail, max_memory_mb)
    except BaseException as error:
        task.reply(0, ok=False, error=f"{type(error).__name__}: {error}")
        return
    task.reply(0, ok=True, result={"info": info, "missing": missing})
    task.serve()


def _check_snapshot(files: dict[str, str], apps: list[str]) -> None:
    """Refuse a snapshot that AppWorld's own save could not have written: the evaluator runs its statements."""
    allowed = {f"{app}.jsonl" for app in apps} | {"model_hashes.json"}
    if not isinstance(files, dict) or not set(files) <= allowed or not all(isinstance(v, str) for v in files.values()):
        raise ValueError(f"unexpected files {sorted(set(files) - allowed)[:3]}")
    for name, text in files.items():
        if name == "model_hashes.json":
            json.loads(text)
            continue
        for line in text.splitlines():
            statement, parameters, many = json.loads(line)
            words = statement.split(None, 1) if isinstance(statement, str) else []
            if (not words or words[0].upper() not in CHANGE_STATEMENTS or not isinstance(parameters, (list, dict))
                    or not isinstance(many, bool)):
                raise ValueError(f"not a recorded database change: {str(statement)[:80]!r}")


class _Refused(Exception):
    """The agent's saved state cannot be judged: the task fails."""


def _judge(task_id: str, files: dict[str, str], outputs: str) -> dict:
    from appworld.evaluator import evaluate_task
    from appworld.task import Task

    task = Task.load(task_id=task_id, load_ground_truth=False)
    try:
        _check_snapshot(files, [*task.allowed_apps, "admin", "supervisor"])
    except (ValueError, TypeError) as error:
        raise _Refused(f"the task's saved state was refused: {error}")
    dbs = Path(outputs) / "tasks" / task_id / "dbs"
    dbs.mkdir(parents=True)
    for name, text in files.items():
        (dbs / name).write_text(text)
    try:  # an absolute experiment name makes AppWorld read the state from `outputs`; no report is written
        tracker = evaluate_task(task_id=task_id, experiment_name=outputs, save_report=False).to_dict()
    except Exception as error:  # e.g. a statement SQLite refuses: the state is the agent's doing
        raise _Refused(f"the task's saved state could not be loaded: {type(error).__name__}: {error}")
    return {"success": bool(tracker["success"]), "num_tests": int(tracker["num_tests"]),
            "passes": [p["requirement"] for p in tracker["passes"]],
            "failures": [f["requirement"] for f in tracker["failures"]],
            "traces": {f["requirement"]: f["trace"] for f in tracker["failures"]}}


def _evaluate_main(write_end: int, task_id: str, files: dict[str, str]) -> None:
    """Body of a forked evaluator (it never runs agent code): check the snapshot, judge it, reply on write_end."""
    outputs = tempfile.mkdtemp(prefix="prost-eval-")
    try:
        reply = {"ok": True, "result": _judge(task_id, files, outputs)}
    except _Refused as refused:
        reply = {"ok": True, "result": {"success": False, "num_tests": 1, "passes": [], "failures": [str(refused)],
                                        "traces": {}}}
    except BaseException as error:
        reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    finally:
        shutil.rmtree(outputs, ignore_errors=True)
    with os.fdopen(write_end, "wb") as pipe:
        pipe.write(json.dumps(reply).encode())


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as `uid` (a sandbox uid): a fork that takes that uid and kills all it may."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)  # every process this uid may signal, itself last
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


class _Zygote:
    """Privileged worker-process side: appworld imported and warmed up; forks task processes and evaluators.

    It never runs agent code, so nothing it hands down to a fork (its memory, its open files) is the agent's."""

    def __init__(self, max_output_chars: int, max_memory_mb: int | None):
        self.max_output_chars, self.max_memory_mb = max_output_chars, max_memory_mb
        self.scratch = tempfile.mkdtemp(prefix="prost-world-")  # root-only; AppWorld's open-time output goes here
        self.jail = os.path.join(self.scratch, "jail")  # empty, and not even listable by the sandbox uid
        os.mkdir(self.jail, 0o700)
        os.mkdir(self.jail + SANDBOX_CWD, 0o700)
        self.tasks: set[int] = set()  # pids of task processes not yet ended (not reaped, so never reused)
        self._warm_up()

    def _warm_up(self) -> None:
        """Import here every module a task may need (a locked-in task process can import nothing new): all
        apps, every module AppWorld's guard lets agent code import, and those imported lazily on the way; then
        open one task and run a few kinds of code in it. Finally close every file that left open."""
        import importlib

        from appworld import AppWorld
        from appworld.apps import get_all_apps
        from appworld.common.path_store import path_store
        from appworld.common.safety_guard import ALLOWED_MODULE_NAMES

        for name in [*ALLOWED_MODULE_NAMES, *WARM_UP_MODULES, *(f"appworld.apps.{app}.{part}"
                                                               for app in get_all_apps() for part in ("models", "apis"))]:
            try:
                importlib.import_module(name)
            except ImportError:  # not installed, or not a module in this version: agent code gets the same error
                pass

        tasks = sorted(os.listdir(Path(path_store.data) / "tasks"))
        if not tasks:
            return
        world = AppWorld(task_id=tasks[0], experiment_name=os.path.join(self.scratch, "warm-up"),
                         timeout_seconds=5, load_ground_truth=False)
        for code in ("x = [1]\nprint(x)", "print(apis.api_docs.show_app_descriptions())",
                     "import datetime\nprint(datetime.datetime.strptime('2023-06-01', '%Y-%m-%d'))",
                     "import pendulum\nprint(pendulum.now('UTC'))",
                     "apis.supervisor.show_profile()", "apis.supervisor.show_account_passwords(access_token=0)",
                     "raise ValueError('warm-up')", "import os", "def f(:\n  pass"):
            world.execute(code)
        world.close()
        shutil.rmtree(os.path.join(self.scratch, "warm-up"), ignore_errors=True)
        _close_databases()

    def open(self, conn, task_id: str, timeout: int) -> tuple[int, socket.socket]:
        """Fork a task process for task_id; returns its pid and the caller's end of its channel."""
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        outputs = os.path.join(self.scratch, f"task-{len(self.tasks)}-{time.monotonic_ns()}")
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                conn.close()
                _task_main(Connection(theirs.detach()), task_id, timeout, outputs, self.jail,
                           self.max_output_chars, self.max_memory_mb)
            finally:
                os._exit(0)
        theirs.close()
        self.tasks.add(pid)
        return pid, ours

    def end(self, pid: int) -> None:
        """Kill a task process and every process it started, and reap it."""
        if pid not in self.tasks:
            return
        self.tasks.discard(pid)
        for kill in (os.kill, os.killpg):
            try:
                kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if os.geteuid() == 0:
            _kill_uid(SANDBOX_UID_BASE + pid)
        os.waitpid(pid, 0)

    def evaluate(self, task_id: str, files: dict[str, str], timeout: float) -> dict:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                _evaluate_main(write_end, task_id, files)
            finally:
                os._exit(0)
        os.close(write_end)
        chunks, deadline = [], time.monotonic() + timeout
        try:
            while True:
                ready, _, _ = select.select([read_end], [], [], max(deadline - time.monotonic(), 0))
                chunk = os.read(read_end, 1 << 20) if ready else None
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(read_end)
        if chunk is None:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if chunk is None:
            raise RuntimeError(f"the evaluator did not finish within {timeout:.0f}s")
        reply = json.loads(b"".join(chunks) or b'{"ok": false, "error": "the evaluator died"}')
        if not reply["ok"]:
            raise RuntimeError(reply["error"])
        return reply["result"]

    def cpu_seconds(self) -> float:
        """CPU time of this process, its reaped forks, and its live task processes."""
        import resource
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        live = 0
        for pid in self.tasks:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                live += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
            except (OSError, IndexError, ValueError):
                pass
        return time.process_time() + children.ru_utime + children.ru_stime + live

    def shutdown(self) -> None:
        for pid in list(self.tasks):
            self.end(pid)
        shutil.rmtree(self.scratch, ignore_errors=True)


def _zygote_main(conn, root: str, max_output_chars: int, max_memory_mb: int | None) -> None:
    """Entry point of a world worker process (spawned, so appworld is imported fresh). Requests from the session
    are (id, command, *args); each reply is (id, status, payload)."""
    import traceback
    from multiprocessing.reduction import send_handle

    os.environ["APPWORLD_ROOT"] = root  # must precede the first appworld import: paths are cached
    try:
        zygote = _Zygote(max_output_chars, max_memory_mb)
        conn.send((0, "ok", None))
    except BaseException:
        conn.send((0, "error", traceback.format_exc()))
        return
    while True:
        try:
            request_id, command, *args = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        try:
            if command == "open":  # the reply, then the task's channel as a passed descriptor
                pid, channel = zygote.open(conn, *args)
                conn.send((request_id, "ok", pid))
                send_handle(conn, channel.fileno(), 0)
                channel.close()
            else:
                conn.send((request_id, "ok", getattr(zygote, command)(*args)))
        except BaseException as error:
            conn.send((request_id, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}"))
        if command == "shutdown":
            break
    zygote.shutdown()


class WorkerLost(RuntimeError):
    """The worker process died, did not answer in time, or answered out of turn (it has been killed)."""


_warned: set[str] = set()


def _warn_once(missing: list[str]) -> None:
    """One line on stderr, once per process, naming the protections this machine cannot give agent code."""
    line = ", ".join(missing)
    if line and line not in _warned:
        _warned.add(line)
        print(f"world.py: warning: agent code runs without {line}; see README 'The sandbox'", file=sys.stderr)


class WorldSession:
    """One AppWorld task at a time, each in a fresh sandboxed process; the caller never runs agent code itself.

    A session owns a privileged worker (the zygote, see above). open() forks a task process from it, which
    opens the task and locks itself in before any code runs; execute() sends code to it; evaluate() takes a
    snapshot of its databases and has a fresh fork of the zygote judge it with AppWorld's evaluator.

    timeout: seconds per execute (AppWorld's own SIGALRM timeout). Code that does not return within
    timeout + grace (e.g. stuck inside C code, where the alarm cannot reach it), a task process that dies or
    answers out of turn, and code that raises a BaseException out of AppWorld (KeyboardInterrupt, SystemExit,
    ...) are reported as a failed execution right away; the task process is replaced, the task reopened and its
    earlier code replayed before the next call. budget_seconds: total wall time per opened task, after which
    execute refuses. max_output_chars: execute outputs, and AppWorld's log of them, are truncated to this size
    (head and tail kept). max_memory_mb: address-space cap of a task process, so runaway code gets a
    MemoryError, not the machine.
    """

    def __init__(self, root: str | Path | None = None, timeout: float = 20, max_output_chars: int = 20_000,
                 budget_seconds: float | None = None, start_timeout: float = 180, grace: float = 10,
                 max_memory_mb: int | None = 6144):
        self.root = str(Path(root or world_root()).resolve())
        self.timeout, self.max_output_chars, self.budget_seconds = timeout, max_output_chars, budget_seconds
        self.start_timeout, self.grace, self.max_memory_mb = start_timeout, grace, max_memory_mb
        self.process = self.conn = None  # the zygote
        self.channel, self.task_pid = None, None  # the open task's process
        self.task: TaskInfo | None = None
        self.history: list[str] = []  # code that ran in the open task, replayed after a restart
        self.opened_at = 0.0
        self.restarts = 0
        self.lost = False  # the task process was lost or replaced mid-task: recover before the next call
        self.missing: list[str] = []  # protections the sandbox could not get on this machine
        self._request_id = 0

    # -- the zygote ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker process now (open() does it lazily); returns once appworld is imported."""
        if self.process is not None and self.process.is_alive():
            return
        self._kill()
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_zygote_main, daemon=True, name="prost-world",
                                   args=(child, self.root, self.max_output_chars, self.max_memory_mb))
        self.process.start()
        child.close()
        self._reply(0, self.start_timeout, "start")

    def _kill(self) -> None:
        self._drop_channel()
        if self.process is None:
            return
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()
        self.process = self.conn = None

    def _next_id(self) -> int:
        self._request_id += 1
        return self._request_id

    def _reply(self, request_id: int, timeout: float, what: str) -> Any:
        if not self.conn.poll(timeout):
            self._kill()
            raise WorkerLost(f"the world worker did not answer {what} within {timeout:.0f}s and was killed")
        try:
            answered, status, payload = self.conn.recv()
        except (EOFError, OSError):
            self._kill()
            raise WorkerLost(f"the world worker died during {what}")
        if answered != request_id:
            self._kill()
            raise WorkerLost(f"the world worker answered request {answered} instead of {request_id} ({what})")
        if status == "error":
            raise RuntimeError(f"AppWorld {what} failed: {payload}")
        return payload

    def _call(self, timeout: float, command: str, *args: Any) -> Any:
        if self.process is None or not self.process.is_alive():
            self._kill()
            raise WorkerLost(f"the world worker died before {command}")
        request_id = self._next_id()
        try:
            self.conn.send((request_id, command, *args))
        except (BrokenPipeError, OSError):
            self._kill()
            raise WorkerLost(f"the world worker died before {command}")
        return self._reply(request_id, timeout, command)

    # -- the task process (untrusted: its replies are checked JSON, never unpickled) -------------------
    def _drop_channel(self) -> None:
        """End the open task's process (and all it started) if there is one."""
        channel, pid, self.channel, self.task_pid = self.channel, self.task_pid, None, None
        if channel is not None:
            channel.close()
        if pid is not None and self.process is not None and self.process.is_alive():
            try:
                self._call(self.start_timeout, "end", pid)
            except (WorkerLost, RuntimeError):
                pass

    def _task_reply(self, request_id: int, timeout: float, limit: int, what: str) -> Any:
        if not self.channel.poll(timeout):
            self._drop_channel()
            raise WorkerLost(f"the world worker did not answer {what} within {timeout:.0f}s and was killed")
        try:
            reply = json.loads(self.channel.recv_bytes(limit))
            answered, ok = reply["id"], reply["ok"]
        except (EOFError, OSError):
            self._drop_channel()
            raise WorkerLost(f"the world worker died during {what}")
        except (ValueError, KeyError, TypeError):
            self._drop_channel()
            raise WorkerLost(f"the world worker sent a malformed reply to {what} and was killed")
        if answered != request_id:
            self._drop_channel()
            raise WorkerLost(f"the world worker answered another request during {what} and was killed")
        if reply.get("replace"):  # the process may be in any state: never reuse it
            self._drop_channel()
            self.lost = True
        if not ok:
            raise RuntimeError(f"AppWorld {what} failed: {reply.get('error')}")
        return reply["result"]

    def _task_call(self, timeout: float, limit: int, command: str, *args: Any) -> Any:
        if self.channel is None:
            raise WorkerLost(f"the world worker died before {command}")
        request_id = self._next_id()
        try:
            self.channel.send_bytes(json.dumps({"id": request_id, "command": command, "args": args}).encode())
        except OSError:
            self._drop_channel()
            raise WorkerLost(f"the world worker died before {command}")
        return self._task_reply(request_id, timeout, limit, command)

    # -- task API --------------------------------------------------------------------------------------
    def open(self, task_id: str) -> TaskInfo:
        """Open a task (closing any open one) in a fresh sandboxed process; returns what the agent may see."""
        from multiprocessing.connection import Connection
        from multiprocessing.reduction import recv_handle

        task_dir(task_id, self.root)  # a clear error for unknown ids, before touching the worker
        self.start()
        self._drop_channel()
        pid = self._call(self.start_timeout, "open", task_id, int(self.timeout))
        self.channel, self.task_pid = Connection(recv_handle(self.conn)), pid
        opened = self._task_reply(0, self.start_timeout, 1 << 24, "open")
        try:
            info, missing = TaskInfo(**opened["info"]), [str(m) for m in opened["missing"]]
        except (KeyError, TypeError) as error:
            self._drop_channel()
            raise WorkerLost(f"the world worker sent a malformed reply to open: {error}")
        self.missing = missing
        _warn_once(missing)
        self.task, self.history, self.opened_at, self.lost = info, [], time.monotonic(), False
        return self.task

    def remaining_budget(self) -> float | None:
        if self.budget_seconds is None:
            return None
        return self.budget_seconds - (time.monotonic() - self.opened_at)

    def _run(self, code: str, limit: float) -> tuple[str, bool]:
        output, error = self._task_call(limit + self.grace, 8 * self.max_output_chars + 4096, "execute",
                                        code, int(limit))
        if not isinstance(output, str) or not isinstance(error, bool):
            self._drop_channel()
            raise WorkerLost("the world worker sent a malformed reply to execute and was killed")
        return output, error

    def execute(self, code: str) -> Execution:
        """Run agent code in the task's AppWorld shell; failures come back as error outputs."""
        if self.task is None:
            raise RuntimeError("no open task: call open(task_id) first")
        limit = self.timeout
        remaining = self.remaining_budget()
        if remaining is not None:
            if remaining <= 0:
                return Execution(FAILED + f"The wall-time budget of {self.budget_seconds:.0f}s for this task "
                                          "is used up; no more code can run.", True)
            limit = min(limit, max(remaining, 1))
        if self.lost:
            try:
                self._recover()
            except (WorkerLost, RuntimeError) as failure:
                return Execution(FAILED + f"The world could not be restarted: {failure}", True)
        restart = ("The world will be restarted and the earlier code replayed, so its state will be as "
                   "before this code.")
        try:
            output, error = self._run(code, limit)
        except WorkerLost as lost:
            self.lost = True
            return Execution(FAILED + f"{lost}. {restart}", True)
        except RuntimeError as failure:  # AppWorld itself raised (not agent code: that is caught inside)
            return Execution(truncate(FAILED + str(failure), self.max_output_chars), True)
        if self.lost:  # the code raised a BaseException: the process was replaced, its state is gone
            return Execution(truncate(output, self.max_output_chars) + f"\n{restart}", True)
        self.history.append(code)
        return Execution(truncate(output, self.max_output_chars), error)

    def _recover(self) -> None:
        """Fork a new task process, reopen the task and replay the earlier code so its state is back."""
        self.restarts += 1
        history, opened_at = self.history, self.opened_at
        self.open(self.task.task_id)
        self.opened_at = opened_at  # the budget keeps running across restarts
        for code in history:
            try:
                self._run(code, self.timeout)
            except WorkerLost:  # it did not hang the first time; give up on the rest of the replay
                self.lost = True
                return
            if self.lost:
                return
            self.history.append(code)

    def evaluate(self) -> Evaluation:
        """Judge the open task's current state with AppWorld's own evaluator, in a process that never ran
        agent code."""
        if self.task is None:
            raise RuntimeError("no open task: call open(task_id) first")
        if self.lost:
            self._recover()
        if not (Path(self.root) / "data" / "tasks" / self.task.task_id / "ground_truth").is_dir():
            raise RuntimeError(f"task {self.task.task_id} has no ground truth, so it cannot be evaluated")
        try:
            files = self._task_call(self.start_timeout, SNAPSHOT_LIMIT, "snapshot")
        except (WorkerLost, RuntimeError) as failure:  # e.g. over SNAPSHOT_LIMIT: the evaluator refuses it
            self.lost = self.lost or isinstance(failure, WorkerLost)
            files = {"(no snapshot)": str(failure)}
        return Evaluation(**self._call(self.start_timeout, "evaluate", self.task.task_id, files,
                                       self.start_timeout))

    def cpu_seconds(self) -> float:
        """CPU time the worker and its task and evaluator processes have used so far (for benchmarks)."""
        return self._call(self.start_timeout, "cpu_seconds")

    def close(self) -> None:
        """Close the task and stop the worker process; no process of the session is left behind."""
        if self.process is not None and self.process.is_alive():
            self._drop_channel()
            try:
                self._call(30, "shutdown")
            except (WorkerLost, RuntimeError):
                pass
        self._kill()
        self.task = None

    def __enter__(self) -> "WorldSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "process", None) is not None and self.process.is_alive():
            self.process.kill()


def run_codes(session: WorldSession, task_id: str, codes: list[str]) -> tuple[list[Execution], Evaluation]:
    """Open a task, execute each code block in order, evaluate: the gold-solution / replay loop."""
    session.open(task_id)
    executions = [session.execute(code) for code in codes]
    return executions, session.evaluate()


class WorldPool:
    """n WorldSessions in parallel worker processes; `map` hands each job a free session."""

    def __init__(self, n: int, **session_kwargs: Any):
        if n < 1:
            raise ValueError(f"a WorldPool needs at least one worker, got n={n}")
        self.sessions = [WorldSession(**session_kwargs) for _ in range(n)]
        self._free: list[WorldSession] = list(self.sessions)
        self._lock = threading.Condition()
        with ThreadPoolExecutor(n) as starter:  # import appworld in all workers at once
            list(starter.map(WorldSession.start, self.sessions))

    def _acquire(self) -> WorldSession:
        with self._lock:
            while not self._free:
                self._lock.wait()
            return self._free.pop()

    def _release(self, session: WorldSession) -> None:
        with self._lock:
            self._free.append(session)
            self._lock.notify()

    def run(self, fn: Callable[[WorldSession, Any], Any], item: Any) -> Any:
        """Run fn(session, item) on a free session (blocks until one is free)."""
        session = self._acquire()
        try:
            return fn(session, item)
        finally:
            self._release(session)

    def map(self, fn: Callable[[WorldSession, Any], Any], items: list[Any]) -> list[Any]:
        """fn(session, item) for every item, n at a time; results in input order."""
        with ThreadPoolExecutor(len(self.sessions)) as threads:
            return list(threads.map(lambda item: self.run(fn, item), items))

    def close(self) -> None:
        for session in self.sessions:
            session.close()

    def __enter__(self) -> "WorldPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
