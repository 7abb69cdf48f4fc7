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
never runs agent code (the zygote, a fresh interpreter holding nothing of the caller's program): the fork
opens the task (without its ground truth) and then locks itself in (an empty chroot, a uid of its own,
seccomp, Landlock, resource limits) before it runs any code in AppWorld's guarded executor. A task is judged
by AppWorld's evaluator in another fork of the zygote, which trusts nothing the task sent: it checks the
snapshot of the task's database changes, works out from them which tables changed, and drops to a uid of
its own, with limits and a guarded SQLite, before it runs them. Every read from a task process has a
deadline: a hung, dead or misbehaving task process is killed and the call reported as a failed execution
(a failed judgement fails the task), so the caller never hangs; before the next call a new process reopens
the task and the task's earlier code is replayed to restore its state. Where this machine cannot build the
whole sandbox, sessions refuse to start unless told to run unsafely ($PROST_UNSAFE_WEAK_SANDBOX=1).

This module never imports torch, and imports appworld only inside worker processes.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
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
# Evaluation runs in another fork of the zygote (the judge), from a snapshot of the task's database changes that
# the sandboxed process sends back: the judge parses it with limits, recomputes what it needs, and drops its own
# privileges before SQLite runs any of it. See docs/sandbox.md.

SANDBOX_UID_BASE = 2_000_000_000  # a task process runs as uid = gid = base + its pid: unique, owns no file
SANDBOX_MAX_THREADS = 16  # RLIMIT_NPROC of that uid: AppWorld's API client needs a thread per call
SANDBOX_MAX_FILES = 64  # RLIMIT_NOFILE
SANDBOX_CWD = "/prost-sandbox"  # the working directory inside the (empty) chroot
SNAPSHOT_LIMIT = 256 * 2**20  # bytes: a task's database changes, as sent back for evaluation
MAX_CHANGE_CHARS = 16 * 2**20  # one recorded change in a snapshot (a statement and its parameters)
UNSAFE_SQL_FUNCTIONS = {"fts3_tokenizer", "load_extension"}  # a pointer argument, native code: never in the judge
CHANGE_STATEMENTS = ("INSERT", "UPDATE", "DELETE", "CREATE", "DROP")  # all AppWorld's change tracker records
WARM_UP_MODULES = (  # imported inside functions by Python or AppWorld while serving a task
    "_strptime", "unicodedata", "encodings.idna", "decimal", "unittest.mock", "base64", "pickle", "secrets",
    "zipfile", "difflib", "ast", "logging", "xxhash", "inflection", "pendulum", "fastapi.exceptions",
    "fastapi.params", "cryptography.hazmat.backends", "cryptography.hazmat.primitives.hashes",
    "cryptography.hazmat.primitives.padding", "cryptography.hazmat.primitives.ciphers")
_LANDLOCK_SYSCALLS = (444, 445, 446)  # create_ruleset, add_rule, restrict_self: same on x86_64 and aarch64
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS, _PR_SET_PDEATHSIG, _PR_SET_KEEPCAPS, _PR_CAPBSET_DROP = 38, 1, 8, 24
_CAP_DAC_READ_SEARCH = 2


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


_SECCOMP_REFUSED = (  # other routes to new processes, files, sockets, other processes' memory, the kernel
    "fork", "vfork", "execve", "execveat", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
    "userfaultfd", "perf_event_open", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "unshare",
    "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsmount", "move_mount", "open_tree",
    "open_by_handle_at", "name_to_handle_at", "mknod", "mknodat", "keyctl", "add_key", "request_key", "kexec_load",
    "init_module", "finit_module")
_SECCOMP_ARCHES = {  # machine -> (audit arch, syscall numbers) for the filter below
    "x86_64": (0xC000003E, {
        "seccomp": 317, "clone": 56, "clone3": 435, "socket": 41, "socketpair": 53, "prctl": 157, "fork": 57,
        "vfork": 58, "execve": 59, "execveat": 322, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "bpf": 321, "userfaultfd": 323, "perf_event_open": 298, "ptrace": 101,
        "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438, "unshare": 272, "setns": 308,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "fsopen": 430, "fsmount": 432,
        "move_mount": 429, "open_tree": 428, "open_by_handle_at": 304, "name_to_handle_at": 303, "mknod": 133,
        "mknodat": 259, "keyctl": 250, "add_key": 248, "request_key": 249, "kexec_load": 246, "init_module": 175,
        "finit_module": 313}),
    "aarch64": (0xC00000B7, {  # the generic table: no fork, vfork or mknod
        "seccomp": 277, "clone": 220, "clone3": 435, "socket": 198, "socketpair": 199, "prctl": 167, "execve": 221,
        "execveat": 281, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 280,
        "userfaultfd": 282, "perf_event_open": 241, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "pidfd_getfd": 438, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "fsopen": 430, "fsmount": 432, "move_mount": 429, "open_tree": 428,
        "open_by_handle_at": 265, "name_to_handle_at": 264, "mknodat": 33, "keyctl": 219, "add_key": 217,
        "request_key": 218, "kexec_load": 104, "init_module": 105, "finit_module": 273}),
}


def _seccomp(libc) -> bool:
    """Install a seccomp filter on every thread: no new process (threads only), no program, no socket but Unix
    ones (by socket, socketpair or io_uring), none of the other routes in _SECCOMP_REFUSED, and no clearing of
    the signal that ends this process with its parent. clone3 answers ENOSYS, so that threads fall back to
    clone, whose flags a filter can read."""
    import ctypes
    if os.uname().machine not in _SECCOMP_ARCHES:
        return False
    arch, nr = _SECCOMP_ARCHES[os.uname().machine]
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF: load word, jumps (offsets skip), return
    allow, deny, nosys, kill = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000  # EPERM, ENOSYS
    number, arch_word, arg0 = 0, 4, 16  # offsets in struct seccomp_data (arg0's low half, little-endian)
    af_unix, clone_thread = 1, 0x00010000
    prog = [(load, 0, 0, arch_word), (jeq, 1, 0, arch), (ret, 0, 0, kill),  # another ABI's numbers
            (load, 0, 0, number), (jge, 0, 1, 0x40000000), (ret, 0, 0, deny)]  # x32 numbers
    for name in _SECCOMP_REFUSED:
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, deny)]
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, nosys)]
    for name in ("socket", "socketpair"):  # each test of arg0 returns on both branches (the number is gone)
        prog += [(jeq, 0, 4, nr[name]), (load, 0, 0, arg0), (jeq, 0, 1, af_unix), (ret, 0, 0, allow),
                 (ret, 0, 0, deny)]
    prog += [(jeq, 0, 4, nr["prctl"]), (load, 0, 0, arg0), (jeq, 0, 1, _PR_SET_PDEATHSIG), (ret, 0, 0, deny),
             (ret, 0, 0, allow),
             (jeq, 0, 4, nr["clone"]), (load, 0, 0, arg0), (jset, 0, 1, clone_thread), (ret, 0, 0, allow),
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
    libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)  # after setuid, which clears it, before seccomp, which keeps it
    seccomp = _seccomp(libc)
    if not seccomp:
        missing.append("a seccomp filter (needs x86_64 or aarch64 Linux)")
    if not _landlock(libc):
        missing.append("Landlock (needs Linux 5.13+ with Landlock enabled)")
    if not (isolated_network or seccomp):
        missing.append("network isolation")
    if not (root or seccomp):
        missing.append("a stop to new processes")
    return missing


# -- the task's channel: length-prefixed JSON messages, every read on the caller's side with a deadline ------------
_FRAME_HEADER = struct.Struct("!Q")  # a message's length in bytes


def _set_deadline(sock: socket.socket, deadline: float | None) -> None:
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)


def send_message(sock: socket.socket, payload: bytes, deadline: float | None = None) -> None:
    """One message: its length, then its bytes. Raises TimeoutError at the deadline (time.monotonic())."""
    _set_deadline(sock, deadline)
    sock.sendall(_FRAME_HEADER.pack(len(payload)) + payload)


def _recv_exactly(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    received = bytearray()
    while len(received) < size:
        _set_deadline(sock, deadline)  # a peer that sends part of a message and stops meets the deadline here
        chunk = sock.recv(min(size - len(received), 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the channel")
        received += chunk
    return bytes(received)


def recv_message(sock: socket.socket, limit: int, deadline: float | None = None) -> bytes:
    """The next message, refused (ValueError) over `limit` bytes; TimeoutError at the deadline, EOFError at the
    end."""
    (size,) = _FRAME_HEADER.unpack(_recv_exactly(sock, _FRAME_HEADER.size, deadline))
    if size > limit:
        raise ValueError(f"a message of {size} bytes, over the limit of {limit}")
    return _recv_exactly(sock, size, deadline)


class _CappedLog(list):
    """AppWorld's in-memory log of executions (environment_io), each entry capped like the agent's output."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def append(self, entry: dict) -> None:
        super().append({key: truncate(value, self.limit) for key, value in entry.items()})


class _TaskProcess:
    """The sandboxed side: one opened AppWorld task; serves JSON requests {id, command, args} on a channel."""

    def __init__(self, channel: socket.socket, max_output_chars: int):
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
        them (rebuilt here in memory: this process has nowhere to write). No model hashes: the judge works out
        which tables changed from these changes itself."""
        from appworld.common.utils import import_models_module
        apps = dict.fromkeys([*self.world.task.allowed_apps, "admin", "supervisor"])
        return {f"{app}.jsonl": "".join(json.dumps(change) + "\n"
                                        for change in import_models_module(app).SQLModel.db.tracker.changes)
                for app in apps}

    def reply(self, request_id: int, **fields: Any) -> None:
        send_message(self.channel, json.dumps({"id": request_id, **fields}).encode())

    def serve(self) -> None:
        while True:
            try:
                request = json.loads(recv_message(self.channel, limit=1 << 40))  # the caller is trusted
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


def _task_main(channel: socket.socket, task_id: str, timeout: int, outputs: str, jail: str, max_output_chars: int,
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


def _parse_change(line: str) -> list:
    """One recorded database change as AppWorld's tracker records it, [statement, parameters, many], with
    parameters a row of plain values (many: a list of rows); ValueError for anything else, of any size or depth."""
    if len(line) > MAX_CHANGE_CHARS:
        raise ValueError(f"a recorded change of {len(line)} characters (limit {MAX_CHANGE_CHARS})")
    try:
        change = json.loads(line)
    except RecursionError:  # the decoder's own depth limit
        raise ValueError("a recorded change nested too deeply")
    if not (isinstance(change, list) and len(change) == 3):
        raise ValueError(f"not a recorded database change: {line[:80]!r}")
    statement, parameters, many = change
    words = statement.split(None, 1) if isinstance(statement, str) else []
    rows = parameters if many is True and isinstance(parameters, list) else [parameters]
    if (not words or words[0].upper() not in CHANGE_STATEMENTS or not isinstance(many, bool)
            or not all(_is_row(row) for row in rows)):
        raise ValueError(f"not a recorded database change: {str(statement)[:80]!r}")
    return change


def _is_row(row: Any) -> bool:
    values = row.values() if isinstance(row, dict) else row if isinstance(row, list) else None
    return values is not None and all(isinstance(value, (str, int, float, bool, type(None))) for value in values)


def _parse_snapshot(files: Any, apps: list[str]) -> dict[str, list[list]]:
    """A task's snapshot, {app}.jsonl -> its recorded changes, checked line by line; every app gets a list (an
    app the task left out has none: its absent log would start it from an empty database)."""
    allowed = {f"{app}.jsonl": app for app in apps}
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ValueError("not a snapshot: a mapping of file names to text")
    if not set(files) <= set(allowed):
        raise ValueError(f"unexpected files {sorted(map(str, set(files) - set(allowed)))[:3]}")
    changes = {app: [] for app in apps}
    for name, text in files.items():
        changes[allowed[name]] = [_parse_change(line) for line in text.splitlines()]
    return changes


def _changed_model_hashes(changes: dict[str, list[list]]) -> dict[str, dict[str, int]]:
    """AppWorld's model hashes (which tables changed) worked out from the change log, never taken from the task:
    every table of an app with any recorded change is marked changed, with a value no count of changes takes,
    so the evaluator compares all of them row by row (a cascade or a trigger reaches tables no statement names)."""
    from appworld.common.utils import import_models_module
    return {app: {name: -1 for name in import_models_module(app).SQLModel.name_to_model() if name != "SQLModel"}
            for app, app_changes in changes.items() if app_changes}


def _sql_authorizer(action: int, arg1: str | None, arg2: str | None, database: str | None,
                    trigger: str | None) -> int:
    """SQLite's authorizer in the judge: no function that takes a pointer or loads code, no other database."""
    import sqlite3
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in UNSAFE_SQL_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _guard_sqlite() -> None:
    """Give every SQLite connection this process opens from now on the authorizer above (SQLAlchemy connects
    through sqlite3.dbapi2, AppWorld through sqlite3; the judge opens its databases after this)."""
    import sqlite3
    connect = sqlite3.dbapi2.connect

    def guarded_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = connect(*args, **kwargs)
        connection.set_authorizer(_sql_authorizer)
        return connection

    sqlite3.connect = sqlite3.dbapi2.connect = guarded_connect


def _keep_only_file_reading(libc, uid: int) -> None:
    """Become `uid`, keeping one capability, CAP_DAC_READ_SEARCH (read any file: the world root may be readable
    by root alone), and none that could be regained."""
    import ctypes
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last + 1):
        if capability != _CAP_DAC_READ_SEARCH:
            libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)
    libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    bit = 1 << _CAP_DAC_READ_SEARCH
    sets = (ctypes.c_uint32 * 6)(bit, bit, 0, 0, 0, 0)  # (effective, permitted, inheritable) x (low, high word)
    if libc.capset(header, sets) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _become_judge(outputs: str, timeout: float, max_memory_mb: int | None) -> None:
    """Drop this (forked, judging) process's privileges before it touches a task's recorded SQL: a uid of its
    own that owns `outputs` alone and may read but not write other files, limits on memory, CPU time, file
    size, files and threads, and the task processes' seccomp filter."""
    import resource
    libc = _libc()
    _set_memory_limit(max_memory_mb)
    cpu = int(timeout) + 1
    for limit, (soft, hard) in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_CORE, (0, 0)),
                                (resource.RLIMIT_FSIZE, (SNAPSHOT_LIMIT, SNAPSHOT_LIMIT)),
                                (resource.RLIMIT_NOFILE, (256, 256))):
        resource.setrlimit(limit, (soft, hard))
    if os.geteuid() == 0:
        uid = SANDBOX_UID_BASE + os.getpid()
        for folder, names, files in os.walk(outputs):
            for path in [folder, *(os.path.join(folder, name) for name in names + files)]:
                os.chown(path, uid, uid)
        resource.setrlimit(resource.RLIMIT_NPROC, (SANDBOX_MAX_THREADS, SANDBOX_MAX_THREADS))
        _keep_only_file_reading(libc, uid)
    libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if not _seccomp(libc) and os.uname().machine in _SECCOMP_ARCHES:
        raise OSError("the judge could not install its seccomp filter")


class _Refused(Exception):
    """The agent's saved state cannot be judged: the task fails."""


def _judge(task_id: str, files: Any, outputs: str, timeout: float, max_memory_mb: int | None) -> dict:
    """AppWorld's evaluator on a task's snapshot, trusting nothing in it: the changes are checked and written
    out again by this process, the model hashes worked out from them, and privileges dropped before SQLite
    runs any of them."""
    from appworld.evaluator import evaluate_task
    from appworld.task import Task

    task = Task.load(task_id=task_id, load_ground_truth=False)
    try:
        changes = _parse_snapshot(files, [*task.allowed_apps, "admin", "supervisor"])
    except Exception as error:  # of any kind: the snapshot is the agent's doing
        raise _Refused(f"the task's saved state was refused: {type(error).__name__}: {error}")
    dbs = Path(outputs) / "tasks" / task_id / "dbs"
    dbs.mkdir(parents=True)
    for app, app_changes in changes.items():
        (dbs / f"{app}.jsonl").write_text("".join(json.dumps(change) + "\n" for change in app_changes))
    (dbs / "model_hashes.json").write_text(json.dumps(_changed_model_hashes(changes)))
    _become_judge(outputs, timeout, max_memory_mb)
    _guard_sqlite()
    try:  # an absolute experiment name makes AppWorld read the state from `outputs`; no report is written
        tracker = evaluate_task(task_id=task_id, experiment_name=outputs, save_report=False).to_dict()
    except Exception as error:  # e.g. a statement SQLite refuses: the state is the agent's doing
        raise _Refused(f"the task's saved state could not be loaded: {type(error).__name__}: {error}")
    return {"success": bool(tracker["success"]), "num_tests": int(tracker["num_tests"]),
            "passes": [p["requirement"] for p in tracker["passes"]],
            "failures": [f["requirement"] for f in tracker["failures"]],
            "traces": {f["requirement"]: f["trace"] for f in tracker["failures"]}}


def _evaluate_main(write_end: int, task_id: str, files: Any, timeout: float, max_memory_mb: int | None) -> None:
    """Body of a forked judge (it never runs agent code): check the snapshot, judge it, reply on write_end."""
    outputs = tempfile.mkdtemp(prefix="prost-eval-")
    try:
        reply = {"ok": True, "result": _judge(task_id, files, outputs, timeout, max_memory_mb)}
    except _Refused as refused:
        reply = {"ok": True, "result": {"success": False, "num_tests": 1, "passes": [], "failures": [str(refused)],
                                        "traces": {}}}
    except BaseException as error:
        reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    finally:
        shutil.rmtree(outputs, ignore_errors=True)
    with os.fdopen(write_end, "wb") as pipe:
        pipe.write(json.dumps(reply).encode())


def _judgement(reply: bytes) -> dict:
    """A judge's reply, checked: a judge that ran a task's SQL is trusted no more than the task."""
    try:
        parsed = json.loads(reply or b'{"ok": false, "error": "the judge died"}')
        if not parsed["ok"]:
            raise RuntimeError(str(parsed["error"])[:2000])
        result = parsed["result"]
        checked = {"success": result["success"], "num_tests": result["num_tests"],
                   "passes": [str(p) for p in result["passes"]], "failures": [str(f) for f in result["failures"]],
                   "traces": {str(k): str(v) for k, v in result["traces"].items()}}
        if not isinstance(checked["success"], bool) or not isinstance(checked["num_tests"], int):
            raise TypeError("success or num_tests of the wrong type")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise RuntimeError(f"the judge sent a malformed reply: {type(error).__name__}: {error}")
    return checked


def _kill_sandbox_process(pid: int) -> None:
    """SIGKILL a task process whose zygote is gone, and so was not reaped: its pid may belong to another process
    by now, so only if it still runs as its sandbox uid (with root) or leads its own process group (without)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        uid = int(status.split("\nUid:")[1].split()[0])
        group = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return
    if uid == SANDBOX_UID_BASE + pid or (uid == os.geteuid() != 0 and group == pid):
        try:
            os.killpg(pid, signal.SIGKILL) if group == pid else os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


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
        self.missing = self._probe()

    def _probe(self) -> list[str]:
        """The protections this machine cannot give a task process: a fork locks itself in and says."""
        def lock_in_and_report(write_end: int) -> None:
            os.write(write_end, json.dumps(_lock_in(self.jail, self.max_memory_mb)).encode())
        return [str(m) for m in json.loads(self._fork_and_read(lock_in_and_report, 60, 1 << 16, "the probe"))]

    def _fork_and_read(self, body: Callable[[int], None], timeout: float, limit: int, what: str) -> bytes:
        """Fork a child that runs body(write_end); what it writes there, read until it ends. A child that runs
        past `timeout` or writes over `limit` bytes is killed (RuntimeError)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                body(write_end)
            finally:
                os._exit(0)
        os.close(write_end)
        received, deadline, ended = bytearray(), time.monotonic() + timeout, False
        try:
            while not ended and len(received) <= limit:
                ready, _, _ = select.select([read_end], [], [], max(deadline - time.monotonic(), 0))
                if not ready:
                    break
                chunk = os.read(read_end, 1 << 20)
                received += chunk
                ended = not chunk
        finally:
            os.close(read_end)
        if not ended:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not ended:
            raise RuntimeError(f"{what} did not finish within {timeout:.0f}s" if len(received) <= limit
                               else f"{what} wrote over {limit} bytes")
        return bytes(received)

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
        ours, theirs = socket.socketpair()
        outputs = os.path.join(self.scratch, f"task-{len(self.tasks)}-{time.monotonic_ns()}")
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                conn.close()
                _task_main(theirs, task_id, timeout, outputs, self.jail,
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

    def evaluate(self, task_id: str, files: Any, timeout: float) -> dict:
        """Judge a task's snapshot in a fresh fork that drops its privileges first (see _judge)."""
        def judge(write_end: int) -> None:
            _evaluate_main(write_end, task_id, files, timeout, self.max_memory_mb)
        return _judgement(self._fork_and_read(judge, timeout, 64 * 2**20, "the judge"))

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


# `python -I -c ZYGOTE_ENTRY REPO FD SETTINGS`: a fresh interpreter that imports world.py and AppWorld and nothing of
# the program that started it (multiprocessing's spawn would import that program's main script again: the
# mini-world's generator, say, from which agent code could rebuild the answers).
ZYGOTE_ENTRY = "import sys; sys.path.insert(0, sys.argv[1]); import world; world._zygote_entry()"


def _zygote_entry() -> None:
    from multiprocessing.connection import Connection
    fd, settings = int(sys.argv[2]), json.loads(sys.argv[3])
    _zygote_main(Connection(fd), **settings)


def _zygote_main(conn, root: str, max_output_chars: int, max_memory_mb: int | None) -> None:
    """Body of a world worker process. Requests from the session are (id, command, *args); each reply is
    (id, status, payload); the first reply, to request 0, lists the protections this machine cannot give."""
    import traceback
    from multiprocessing.reduction import send_handle

    os.environ["APPWORLD_ROOT"] = root  # must precede the first appworld import: paths are cached
    try:
        zygote = _Zygote(max_output_chars, max_memory_mb)
        conn.send((0, "ok", zygote.missing))
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


class SandboxUnavailable(ValueError):
    """This machine cannot build the full sandbox, and running agent code without it was not asked for."""


UNSAFE_ENV = "PROST_UNSAFE_WEAK_SANDBOX"  # set to 1: run agent code even where the full sandbox cannot be built


def sandbox_refusal(missing: list[str]) -> str:
    return (f"world.py: refusing to run agent code without {', '.join(missing)}: run as root on Linux (sudo, or "
            f"as root in a container), or set {UNSAFE_ENV}=1 to run it without them (unsafe: see docs/sandbox.md)")


_warned: set[str] = set()


def _warn_once(missing: list[str]) -> None:
    """One line on stderr, once per process, naming the protections this machine cannot give agent code."""
    line = ", ".join(missing)
    if line and line not in _warned:
        _warned.add(line)
        print(f"world.py: warning: code runs without {line}, as asked (docs/sandbox.md)", file=sys.stderr)


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
    MemoryError, not the machine; the judge gets the same cap. judge_timeout: seconds a judgement may take
    (past it the task counts as failed). unsafe_weak_sandbox: run agent code even where this machine cannot build
    the full sandbox (default: $PROST_UNSAFE_WEAK_SANDBOX=1); otherwise start() raises SandboxUnavailable.
    """

    def __init__(self, root: str | Path | None = None, timeout: float = 20, max_output_chars: int = 20_000,
                 budget_seconds: float | None = None, start_timeout: float = 180, grace: float = 10,
                 max_memory_mb: int | None = 6144, judge_timeout: float = 60,
                 unsafe_weak_sandbox: bool | None = None):
        self.root = str(Path(root or world_root()).resolve())
        self.timeout, self.max_output_chars, self.budget_seconds = timeout, max_output_chars, budget_seconds
        self.start_timeout, self.grace, self.max_memory_mb = start_timeout, grace, max_memory_mb
        self.judge_timeout = judge_timeout
        self.unsafe = os.environ.get(UNSAFE_ENV) == "1" if unsafe_weak_sandbox is None else unsafe_weak_sandbox
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
        """Start the worker process now (open() does it lazily); returns once appworld is imported, or raises
        SandboxUnavailable where the full sandbox cannot be built (and unsafe_weak_sandbox is off)."""
        from multiprocessing.connection import Connection

        if self._zygote_alive():
            return
        self._kill()
        ours, theirs = socket.socketpair()
        settings = {"root": self.root, "max_output_chars": self.max_output_chars, "max_memory_mb": self.max_memory_mb}
        with theirs:
            # -I: none of the caller's paths or environment; -B: importing a task's evaluation.py (the judge)
            # must not write bytecode into the world
            self.process = subprocess.Popen([sys.executable, "-I", "-B", "-c", ZYGOTE_ENTRY, str(REPO),
                                             str(theirs.fileno()), json.dumps(settings)],
                                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        self.conn = Connection(ours.detach())
        self.missing = self._reply(0, self.start_timeout, "start")
        if self.missing and not self.unsafe:
            self._kill()
            raise SandboxUnavailable(sandbox_refusal(self.missing))
        _warn_once(self.missing)

    def _zygote_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _kill(self) -> None:
        self._drop_channel()
        if self.process is None:
            return
        if self._zygote_alive():
            self.process.kill()
        self.process.wait(5)
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
        if not self._zygote_alive():
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
        """End the open task's process (and all it started) if there is one: through the zygote, which reaps
        it, or, if the zygote is gone, directly (the task cannot clear its signal to die with the zygote, so
        this is for a task caught between the two)."""
        channel, pid, self.channel, self.task_pid = self.channel, self.task_pid, None, None
        if channel is not None:
            channel.close()
        if pid is None:
            return
        if self._zygote_alive():
            try:
                self._call(self.start_timeout, "end", pid)
                return
            except (WorkerLost, RuntimeError):
                pass
        _kill_sandbox_process(pid)

    def _task_reply(self, request_id: int, timeout: float, limit: int, what: str) -> Any:
        try:
            reply = json.loads(recv_message(self.channel, limit, time.monotonic() + timeout))
            answered, ok = reply["id"], reply["ok"]
        except TimeoutError:  # no reply, or part of one: either way the process is stuck or hostile
            self._drop_channel()
            raise WorkerLost(f"the world worker did not answer {what} within {timeout:.0f}s and was killed")
        except (EOFError, OSError):
            self._drop_channel()
            raise WorkerLost(f"the world worker died during {what}")
        except (ValueError, KeyError, TypeError, RecursionError):
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
        try:  # a task that stops reading must not block the caller either
            send_message(self.channel, json.dumps({"id": request_id, "command": command, "args": args}).encode(),
                         time.monotonic() + timeout)
        except OSError:  # TimeoutError included
            self._drop_channel()
            raise WorkerLost(f"the world worker died before {command}")
        return self._task_reply(request_id, timeout, limit, command)

    # -- task API --------------------------------------------------------------------------------------
    def open(self, task_id: str) -> TaskInfo:
        """Open a task (closing any open one) in a fresh sandboxed process; returns what the agent may see."""
        from multiprocessing.reduction import recv_handle

        task_dir(task_id, self.root)  # a clear error for unknown ids, before touching the worker
        self.start()
        self._drop_channel()
        pid = self._call(self.start_timeout, "open", task_id, int(self.timeout))
        self.channel, self.task_pid = socket.socket(fileno=recv_handle(self.conn)), pid
        opened = self._task_reply(0, self.start_timeout, 1 << 24, "open")
        try:
            info, missing = TaskInfo(**opened["info"]), [str(m) for m in opened["missing"]]
        except (KeyError, TypeError) as error:
            self._drop_channel()
            raise WorkerLost(f"the world worker sent a malformed reply to open: {error}")
        if missing and not self.unsafe:  # the probe at start said otherwise: refuse all the same
            self._drop_channel()
            raise SandboxUnavailable(sandbox_refusal(missing))
        self.missing = missing
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
            files = self._task_call(self.timeout + self.grace, SNAPSHOT_LIMIT, "snapshot")
        except (WorkerLost, RuntimeError) as failure:  # e.g. over SNAPSHOT_LIMIT: the evaluator refuses it
            self.lost = self.lost or isinstance(failure, WorkerLost)
            files = {"(no snapshot)": str(failure)}
        try:
            return Evaluation(**self._call(self.judge_timeout + self.grace, "evaluate", self.task.task_id, files,
                                           self.judge_timeout))
        except (WorkerLost, RuntimeError) as failure:  # a judge that crashed, hung or sent junk: the task fails
            return Evaluation(False, [], [f"the judge failed, so the task counts as failed: {failure}"], 1)

    def cpu_seconds(self) -> float:
        """CPU time the worker and its task and evaluator processes have used so far (for benchmarks)."""
        return self._call(self.start_timeout, "cpu_seconds")

    def close(self) -> None:
        """Close the task and stop the worker process; no process of the session is left behind."""
        if self._zygote_alive():
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
        if getattr(self, "process", None) is not None and self.process.poll() is None:
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
        try:
            with ThreadPoolExecutor(n) as starter:  # import appworld in all workers at once
                list(starter.map(WorldSession.start, self.sessions))
        except BaseException:  # e.g. SandboxUnavailable: stop the workers that did start
            self.close()
            raise

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
