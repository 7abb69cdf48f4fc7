"""Tests for world.py's sandbox: each attack from issue 17, tried through a real WorldSession on the mini-world.

For every attack: the task it runs in fails (or the attack has no effect), no file under the world root changes
(the whole tree is hashed before and after), and the next task in the same session is unaffected: its gold
solution still passes AppWorld's own evaluator, and doing nothing still fails it.
The sandbox's full protections need root (a chroot and a uid of its own); the tests run as root here and in CI.
"""

import hashlib
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

import miniworld
import world

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the full sandbox needs root (README 'The sandbox')")

QUESTION = "notecount_1"  # a question: its answer is in ground_truth/answer.json
NEXT = "payfriend_1"  # a state change, run after each attack


@pytest.fixture(scope="module")
def session(mini_world):
    with world.WorldSession(mini_world, timeout=5, grace=5, max_output_chars=2_000) as session:
        session.start()
        yield session


def tree_hash(root) -> dict[str, str]:
    """Every file under the world root: relative path -> sha256 of its bytes (and its mode)."""
    hashes = {}
    for path in sorted(Path(root).rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        hashes[str(path.relative_to(root))] = f"{info.st_mode:o}:{hashlib.sha256(content).hexdigest()}"
    return hashes


def next_task_is_unaffected(session):
    session.open(NEXT)
    assert not session.evaluate().success  # doing nothing still fails
    for step in miniworld.gold_subtasks(NEXT, session.root):
        out = session.execute(step["code"])
        assert not out.error, out.output
    assert session.evaluate().success


def attack(session, code, task_id=QUESTION):
    """Open task_id, run the attack code, evaluate; returns (execution, evaluation)."""
    session.open(task_id)
    out = session.execute(code)
    return out, session.evaluate()


@pytest.fixture
def unchanged_world(mini_world, session):
    """Hash the world before and after the test; then run the next task's gold solution in the same session."""
    before = tree_hash(mini_world)
    yield
    assert tree_hash(mini_world) == before
    next_task_is_unaffected(session)


def answer_path(root, task_id=QUESTION):
    return Path(root) / "data" / "tasks" / task_id / "ground_truth" / "answer.json"


def test_reading_the_answer_with_pathlib_fails(mini_world, session, unchanged_world):
    code = (f"import json, pathlib\nanswer = json.loads(pathlib.Path({str(answer_path(mini_world))!r}).read_text())\n"
            "apis.supervisor.complete_task(answer=answer)")
    out, evaluation = attack(session, code)
    assert out.error and "PermissionError" in out.output
    assert not evaluation.success


def test_the_ground_truth_is_not_in_memory(session, unchanged_world):
    code = ("import os\ngc = os.sys.modules['gc']\n"
            "worlds = [o for o in gc.get_objects() if type(o).__name__ == 'AppWorld']\n"
            "print(len(worlds) > 0, {str(w.task.ground_truth) for w in worlds})")
    out, _ = attack(session, code)
    assert (out.output.strip(), out.error) == ("True {'None'}", False)


def test_rewriting_the_ground_truth_through_sys_modules_fails(mini_world, session, unchanged_world):
    other = answer_path(mini_world, "notecount_2")
    code = f"import os\nos.sys.modules['io'].FileIO({str(other)!r}, 'w').write(b'0')"
    out, _ = attack(session, code)
    assert out.error and "PermissionError" in out.output


def test_shell_commands_do_not_run(session, unchanged_world, tmp_path):
    target = tmp_path / "pwned"
    out, _ = attack(session, f"import os\nprint(os.sys.modules['posix'].system('touch {target}'))")
    assert not target.exists()
    assert out.error or out.output.strip() != "0"


def test_deleting_a_base_database_fails(mini_world, session, unchanged_world):
    base = Path(mini_world) / "data" / "base_dbs" / "venmo.db"
    out, _ = attack(session, f"import os\nos.sys.modules['posix'].unlink({str(base)!r})")
    assert out.error and "PermissionError" in out.output and base.is_file()


def test_fork_fails_and_replies_stay_in_order(session, unchanged_world):
    out, _ = attack(session, "import os\nchild = os.sys.modules['posix'].fork()\nprint('forked', child)")
    assert out.error and "Operation not permitted" in out.output
    for n in range(3):  # every later reply answers its own request
        assert session.execute(f"print({n} * 7)").output.strip() == str(n * 7)


def test_patching_the_evaluator_does_not_persist_or_pass(session, unchanged_world):
    code = ("from appworld import AppWorld\nimport os\n"
            "class Passed:\n    success = True\n    def to_dict(self):\n"
            "        return {'success': True, 'num_tests': 1, 'passes': [], 'failures': []}\n"
            "AppWorld.evaluate = lambda self, *a, **k: Passed()\n"
            "os.sys.modules['appworld.evaluator'].evaluate_task = lambda *a, **k: Passed()")
    out, evaluation = attack(session, code)
    assert not out.error, out.output  # the patch itself works, inside the sandboxed process
    assert not evaluation.success
    session.open("notecount_2")  # a new process: the patch is gone there too
    assert session.execute("from appworld import AppWorld\nprint(AppWorld.evaluate.__name__)").output.strip() == "evaluate"


def test_a_forged_database_change_is_refused(session, unchanged_world, tmp_path):
    target = tmp_path / "attached.db"
    code = ("import os\nmodels = os.sys.modules['appworld.apps.venmo.models']\n"
            f"models.SQLModel.db.tracker.changes.append((\"ATTACH DATABASE '{target}' AS x\", [], False))")
    out, evaluation = attack(session, code, NEXT)
    assert not out.error, out.output
    assert not evaluation.success and "refused" in evaluation.failures[0]
    assert not target.exists()


@pytest.mark.parametrize("raised, escapes", [("KeyboardInterrupt", True), ("GeneratorExit", True),
                                             ("type('Custom', (BaseException,), {})()", True),
                                             ("SystemExit(3)", False)])  # IPython reports SystemExit itself
def test_base_exceptions_are_execution_errors(session, raised, escapes, unchanged_world):
    session.open(NEXT)
    assert not session.execute("marker = 41 + 1").error
    pid, restarts = session.task_pid, session.restarts
    out = session.execute(f"raise {raised}")
    assert out.error and ("restarted" in out.output) == escapes
    again = session.execute("print(marker)")  # escaped: a new process, with the earlier code replayed
    assert (again.output.strip(), again.error) == ("42", False)
    assert (session.restarts, session.task_pid != pid) == ((restarts + 1, True) if escapes else (restarts, False))
    assert not session.evaluate().success  # evaluating works (it used to crash the run) and judges the state


def test_a_print_flood_is_capped_and_written_nowhere(mini_world, session, unchanged_world):
    started = time.time()
    session.open(NEXT)
    for _ in range(3):
        out = session.execute("print('x' * 30_000_000)")
        assert len(out.output) < 2_200 and "characters truncated" in out.output
    code = ("import os\ngc = os.sys.modules['gc']\n"
            f"world, = [o for o in gc.get_objects() if type(o).__name__ == 'AppWorld' and o.task_id == {NEXT!r}]\n"
            "print(len(world.environment_io), max(len(e['output']) for e in world.environment_io))")
    count, longest = map(int, session.execute(code).output.split())
    assert count == 3 and longest < 2_200  # AppWorld's own log of the outputs, capped like them
    assert big_new_files(tempfile.gettempdir(), "prost-", started) == []  # the sessions' scratch folders
    assert big_new_files(mini_world, "", started) == []  # AppWorld's environment_io.md grew by every output


def big_new_files(top, prefix, since) -> list[str]:
    """Files over 10 MiB modified since `since` under top's folders named prefix* (vanishing files skipped)."""
    found = []
    for entry in os.scandir(top):
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
            for folder, _, names in os.walk(entry.path):  # errors (folders deleted meanwhile) are skipped
                for name in names:
                    try:
                        info = os.lstat(os.path.join(folder, name))
                    except OSError:
                        continue
                    if info.st_mtime >= since and info.st_size > 10 * 2**20:
                        found.append(os.path.join(folder, name))
    return found


def test_the_task_process_holds_nothing_of_the_world(mini_world, session):
    session.open(NEXT)
    proc = Path(f"/proc/{session.task_pid}")
    opened = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
    mapped = (proc / "maps").read_text()
    assert not [path for path in opened if str(mini_world) in path or path.endswith(".db")]
    assert str(mini_world) not in mapped
    uid = int((proc / "status").read_text().split("Uid:")[1].split()[0])
    assert uid == world.SANDBOX_UID_BASE + session.task_pid
    assert session.missing == []  # every protection was available (root on Linux)


def sandbox_processes(uid):
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"Uid:\t{uid}\t" in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_closing_leaves_no_process_behind(mini_world):
    with world.WorldSession(mini_world, timeout=5, grace=5) as session:
        session.open(NEXT)
        out = session.execute("import os, time\n"
                              "threading = os.sys.modules['threading']\n"
                              "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
                              "print('started')")
        assert out.output.strip() == "started"
        uid = world.SANDBOX_UID_BASE + session.task_pid
        assert sandbox_processes(uid)
        zygote = session.process.pid
    assert sandbox_processes(uid) == []
    with pytest.raises(ProcessLookupError):
        os.kill(zygote, 0)


def running(pid) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_dead_zygote_takes_its_task_with_it(mini_world):
    session = world.WorldSession(mini_world, timeout=5, grace=5)
    try:
        session.open(NEXT)
        task_pid = session.task_pid
        os.kill(session.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while running(task_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(task_pid)
        out = session.execute("print(1)")  # the session notices, and recovers on the next call
        assert out.error and "restarted" in out.output
        assert session.execute("print(2)").output.strip() == "2"
    finally:
        session.close()
