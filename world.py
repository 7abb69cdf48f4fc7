"""world.py: AppWorld sessions for prost, each task in its own sandboxed worker process.

Where this sits in ProST (progressive sub-task training): every other stage needs a world in which
small planner / executor / critic models act by writing Python against AppWorld's `apis`.
  * agents.py opens a `WorldSession`, shows the model the task, runs the code the model writes, and asks
    AppWorld's own evaluator whether the task was solved.
  * evaluate.py runs whole splits through a `WorldPool` and reports TGC / SGC.
The tasks come from an AppWorld data root: the embedded synthetic mini-world that miniworld.py generates
(the default, `miniworld/`), or AppWorld's own downloaded benchmark when APPWORLD_ROOT points at it.

AppWorld freezes the whole process clock, allows one world per process and times out code with SIGALRM
on the main thread, so every world runs in its own spawned worker process. The caller only ever sends code
strings; the code runs inside AppWorld's guarded executor in the worker. A hung or dead worker is killed
and the call reported as a failed execution, so the caller never hangs; before the next call the worker is
restarted and the task's earlier code replayed to restore its state.

This module never imports torch, and imports appworld only inside worker processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
# Sessions: one AppWorld per worker process.
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


def _experiment_name(pid: int) -> str:
    return f"prost-worker-{pid}"


class _Worker:
    """Worker-process side: holds at most one open AppWorld and serves commands from the pipe."""

    def __init__(self, max_output_chars: int):
        from appworld import AppWorld
        from appworld.common.path_store import path_store

        self.AppWorld, self.path_store = AppWorld, path_store
        self.max_output_chars = max_output_chars
        self.experiment = _experiment_name(os.getpid())
        self.world = None

    def open(self, task_id: str, timeout: int) -> dict:
        self.close()
        # Tasks without ground truth (possible in downloaded test data) open, but cannot be evaluated.
        has_truth = (Path(self.path_store.data) / "tasks" / task_id / "ground_truth").is_dir()
        self.world = self.AppWorld(task_id=task_id, experiment_name=self.experiment, timeout_seconds=timeout,
                                   load_ground_truth=has_truth)
        task = self.world.task
        supervisor = {k: task.supervisor[k] for k in ("first_name", "last_name", "email", "phone_number")}
        return {"task_id": task_id, "instruction": task.instruction, "supervisor": supervisor,
                "apps": dict(task.app_descriptions), "datetime": task.datetime.isoformat()}

    def execute(self, code: str, timeout: int) -> tuple[str, bool]:
        self.world.timeout_seconds = max(int(timeout), 1)
        output = self.world.execute(code)
        return truncate(output, self.max_output_chars), output.startswith("Execution failed")

    def evaluate(self) -> dict:
        result = self.world.evaluate().to_dict()
        return {"success": bool(result["success"]), "num_tests": int(result["num_tests"]),
                "passes": [p["requirement"] for p in result["passes"]],
                "failures": [f["requirement"] for f in result["failures"]],
                "traces": {f["requirement"]: f["trace"] for f in result["failures"]}}

    def cpu_seconds(self) -> float:
        return time.process_time()  # not frozen by AppWorld's clock freezing, unlike time.time

    def close(self) -> None:
        if self.world is not None:
            task_id = self.world.task_id
            self.world.close()
            self.world = None
            shutil.rmtree(Path(self.path_store.experiment_outputs) / self.experiment / "tasks" / task_id,
                          ignore_errors=True)


def _set_memory_limit(max_memory_mb: int | None) -> None:
    if not max_memory_mb:
        return
    try:
        import resource
        limit = max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not available on this platform: run without a cap
        pass


def _worker_main(conn, root: str, max_output_chars: int, max_memory_mb: int | None) -> None:
    """Entry point of a world worker process (spawned, so appworld is imported fresh)."""
    import traceback

    os.environ["APPWORLD_ROOT"] = root  # must precede the first appworld import: paths are cached
    _set_memory_limit(max_memory_mb)
    try:
        worker = _Worker(max_output_chars)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            command, *args = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        if command == "shutdown":
            worker.close()
            conn.send(("ok", None))
            break
        try:
            conn.send(("ok", getattr(worker, command)(*args)))
        except BaseException as error:  # report, keep serving; the parent decides what it means
            conn.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}"))


class WorkerLost(RuntimeError):
    """The worker process died or did not answer in time (it has been killed)."""


class WorldSession:
    """One AppWorld task at a time in its own worker process; the caller never runs agent code itself.

    timeout: seconds per execute (AppWorld's own SIGALRM timeout). Code that does not return within
    timeout + grace (e.g. stuck inside C code, where the alarm cannot reach it), or a worker that dies, is
    reported as a failed execution right away; the worker is restarted, the task reopened and its earlier
    code replayed before the next call. budget_seconds: total wall time per opened task, after which execute
    refuses. max_output_chars: execute outputs are truncated to this size (head and tail kept).
    max_memory_mb: address-space cap of the worker, so runaway code gets a MemoryError, not the machine.
    """

    def __init__(self, root: str | Path | None = None, timeout: float = 20, max_output_chars: int = 20_000,
                 budget_seconds: float | None = None, start_timeout: float = 180, grace: float = 10,
                 max_memory_mb: int | None = 6144):
        self.root = str(Path(root or world_root()).resolve())
        self.timeout, self.max_output_chars, self.budget_seconds = timeout, max_output_chars, budget_seconds
        self.start_timeout, self.grace, self.max_memory_mb = start_timeout, grace, max_memory_mb
        self.process = self.conn = None
        self.task: TaskInfo | None = None
        self.history: list[str] = []  # code that ran in the open task, replayed after a worker restart
        self.opened_at = 0.0
        self.restarts = 0
        self.lost = False  # the worker was lost mid-task: recover before the next call

    # -- worker lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker process now (open() does it lazily); returns once appworld is imported."""
        if self.process is not None and self.process.is_alive():
            return
        self._kill()
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, daemon=True, name="prost-world",
                                   args=(child, self.root, self.max_output_chars, self.max_memory_mb))
        self.process.start()
        child.close()
        self._reply(self.start_timeout, "start")

    def _kill(self) -> None:
        if self.process is None:
            return
        pid = self.process.pid
        if pid is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
        self.conn.close()
        self.process = self.conn = None
        shutil.rmtree(Path(self.root) / "experiments" / "outputs" / _experiment_name(pid), ignore_errors=True)

    def _reply(self, timeout: float, what: str) -> Any:
        if not self.conn.poll(timeout):
            self._kill()
            raise WorkerLost(f"the world worker did not answer {what} within {timeout:.0f}s and was killed")
        try:
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            self._kill()
            raise WorkerLost(f"the world worker died during {what}")
        if status == "error":
            raise RuntimeError(f"AppWorld {what} failed: {payload}")
        return payload

    def _call(self, timeout: float, command: str, *args: Any) -> Any:
        if self.process is None or not self.process.is_alive():
            self._kill()
            raise WorkerLost(f"the world worker died before {command}")
        try:
            self.conn.send((command, *args))
        except (BrokenPipeError, OSError):
            self._kill()
            raise WorkerLost(f"the world worker died before {command}")
        return self._reply(timeout, command)

    # -- task API --------------------------------------------------------------------------------------
    def open(self, task_id: str) -> TaskInfo:
        """Open a task (closing any open one); returns what the agent may see about it."""
        task_dir(task_id, self.root)  # a clear error for unknown ids, before touching the worker
        self.start()
        info = self._call(self.start_timeout, "open", task_id, int(self.timeout))
        self.task, self.history, self.opened_at, self.lost = TaskInfo(**info), [], time.monotonic(), False
        return self.task

    def remaining_budget(self) -> float | None:
        if self.budget_seconds is None:
            return None
        return self.budget_seconds - (time.monotonic() - self.opened_at)

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
        try:
            output, error = self._call(limit + self.grace, "execute", code, int(limit))
        except WorkerLost as lost:
            self.lost = True
            return Execution(FAILED + f"{lost}. The world will be restarted and the earlier code replayed, "
                                      "so its state will be as before this code.", True)
        except RuntimeError as failure:  # AppWorld itself raised (not agent code: that is caught inside)
            return Execution(truncate(FAILED + str(failure), self.max_output_chars), True)
        self.history.append(code)
        return Execution(truncate(output, self.max_output_chars), error)

    def _recover(self) -> None:
        """Restart the worker, reopen the task and replay the earlier code so its state is back."""
        self.restarts += 1
        history, opened_at = self.history, self.opened_at
        self.open(self.task.task_id)
        self.opened_at = opened_at  # the budget keeps running across restarts
        for code in history:
            try:
                self._call(self.timeout + self.grace, "execute", code, int(self.timeout))
            except WorkerLost:  # it did not hang the first time; give up on the rest of the replay
                self.lost = True
                return
            self.history.append(code)

    def evaluate(self) -> Evaluation:
        """Run AppWorld's own evaluator on the open task's current state."""
        if self.task is None:
            raise RuntimeError("no open task: call open(task_id) first")
        if self.lost:
            self._recover()
        return Evaluation(**self._call(self.start_timeout, "evaluate"))

    def cpu_seconds(self) -> float:
        """CPU time the worker process has used so far (for benchmarks and compute accounting)."""
        return self._call(self.start_timeout, "cpu_seconds")

    def close(self) -> None:
        """Close the task and stop the worker process."""
        if self.process is not None and self.process.is_alive():
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
