"""Tests for world.py's sandbox: each attack from issues 17 and 31, tried through a real WorldSession on the
mini-world (issue 31's are numbered as in the issue).

For every attack: the task it runs in fails (or the attack has no effect), no file under the world root changes
(the whole tree is hashed before and after), and the next task in the same session is unaffected: its gold
solution still passes AppWorld's own evaluator, and doing nothing still fails it.
The sandbox's full protections need root (a chroot and a uid of its own); the tests run as root here and in CI.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
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


# ------------------------------------------------------------------------------------------------------------
# Issue 31: the judge trusts nothing from the task, the host never waits forever, and the sandbox fails closed.

HELD_OUT_QUESTION = "notecount_5"  # a dev variant of a question scenario: drawn from the build's secret
PARTIAL = b"\x00\x00\x10\x00\x00\x00\x00"  # the start of a message's length, and then nothing more
TASK_PROCESS = "[o for o in os.sys.modules['gc'].get_objects() if type(o).__name__ == '_TaskProcess'][0]"


def in_thread(call, seconds):
    """call() in a daemon thread; (finished, result or exception) after at most `seconds`."""
    import threading
    box = {}

    def run():
        try:
            box["result"] = call()
        except BaseException as error:  # noqa: B036 - handed back to the test
            box["result"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), box.get("result")


def judge_gold_plus(session, changes):
    """Open NEXT, run its gold solution, record `changes` as if the task had made them; evaluate."""
    session.open(NEXT)
    for step in miniworld.gold_subtasks(NEXT, session.root):
        assert not session.execute(step["code"]).error
    code = (f"import os\nmodels = os.sys.modules['appworld.apps.venmo.models']\n"
            f"models.SQLModel.db.tracker.changes.extend({changes!r})")
    out = session.execute(code)
    assert not out.error, out.output
    return session.evaluate()


@pytest.mark.parametrize("step", ["execute", "snapshot"])
def test_1_a_partial_reply_does_not_hang_the_host(mini_world, step, unchanged_world):
    """A task process that sends part of a message and stops (spinning in C, where the alarm cannot reach) is
    killed at its deadline; the session recovers."""
    stall = f"os.sys.modules['posix'].write({TASK_PROCESS}.channel.fileno(), {PARTIAL!r})\nsum(range(10 ** 15))"
    session = world.WorldSession(mini_world, timeout=3, grace=3)
    try:
        session.open(NEXT)
        if step == "execute":
            finished, out = in_thread(lambda: session.execute(f"import os\n{stall}"), 30)
            assert finished, "execute hung on a partial reply"
            assert out.error and "restarted" in out.output
        else:
            code = f"import os\ntask = {TASK_PROCESS}\ndef stalled():\n" + "".join(f"    {line}\n" for line in
                                                                                  stall.splitlines())
            assert not session.execute(code + "task.snapshot = stalled").error
            finished, evaluation = in_thread(session.evaluate, 30)
            assert finished, "evaluate hung on a partial snapshot"
            assert not evaluation.success
        assert session.execute("print(6 * 7)").output.strip() == "42"
    finally:
        if session.task_pid:
            _kill_quietly(session.task_pid)  # unblocks a hung read on the old code
        session.close()


def _kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


@pytest.mark.parametrize("name", ["venmo.jsonl", "model_hashes.json"])
def test_2_a_deeply_nested_snapshot_fails_the_task_and_the_run_goes_on(session, name, unchanged_world):
    deep = "[" * 100_000 + "]" * 100_000
    code = f"import os\ntask = {TASK_PROCESS}\ntask.snapshot = lambda: {{{name!r}: {deep!r}}}"
    session.open(NEXT)
    assert not session.execute(code).error
    evaluation = session.evaluate()  # used to raise RecursionError's report out of the judge
    assert not evaluation.success and "refused" in evaluation.failures[0]


def test_3_output_with_a_lone_surrogate_is_stored_as_it_is(session, tmp_path, unchanged_world):
    import store
    session.open(NEXT)
    out = session.execute("print('a\\udcff b \u00fc')")
    assert not out.error and "\udcff" in out.output
    path = tmp_path / "trajectories.jsonl"
    store.append_lines(path, [{"output": out.output}])  # used to raise UnicodeEncodeError
    assert [store.parse_line(line) for line in path.read_text(encoding="utf-8").splitlines()] == [
        {"output": out.output}]
    store.atomic_write(tmp_path / "report.md", out.output)  # text: the surrogate written as its escape
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == out.output.replace("\udcff", "\\udcff")


REGENERATE = ("import os\nmw = os.sys.modules['miniworld']\n"
              "tasks = mw.generate_tasks(mw.make_population(0), 0)\n"
              f"apis.supervisor.complete_task(answer=tasks[{HELD_OUT_QUESTION!r}][2].answer)")


def test_4_the_generator_is_not_in_the_task_process(mini_world, tmp_path):
    """A program whose main script imports the mini-world's generator (as `miniworld.py check` or evaluate.py
    do): the task process must not hold it, or agent code rebuilds the answers from the public seed."""
    script = tmp_path / "host.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(world.__file__).parent)!r})\n"
        "import miniworld  # noqa: F401  (the generator, loaded in the host)\n"
        "import world\n\n\n"
        "def main(root, task_id, code):\n"
        "    with world.WorldSession(root, timeout=10) as session:\n"
        "        session.open(task_id)\n"
        "        out = session.execute(code)\n"
        "        print(json.dumps({'output': out.output, 'success': session.evaluate().success}))\n\n\n"
        "if __name__ == '__main__':\n"
        "    main(*sys.argv[1:])\n")
    done = subprocess.run([sys.executable, str(script), str(mini_world), HELD_OUT_QUESTION, REGENERATE],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["success"]
    assert "KeyError" in result["output"] and "miniworld" in result["output"]


def test_4_held_out_tasks_do_not_follow_from_the_public_seed(mini_world):
    public = miniworld.generate_tasks(miniworld.make_population(0), 0)  # what code without the secret can rebuild
    splits = {split: world.load_split(split, mini_world) for split in ("train", "dev", "test")}

    def same(task_id):
        specs = json.loads((Path(mini_world) / "data" / "tasks" / task_id / "specs.json").read_text())
        return specs["instruction"] == public[task_id][2].instruction
    assert all(same(t) for t in splits["train"])  # training data follows from the seed: reproducible
    for split in ("dev", "test"):
        assert sum(same(t) for t in splits[split]) < len(splits[split]) / 2, split


def test_5_changes_the_model_hashes_do_not_show_are_judged(session, unchanged_world):
    """The gold solution plus a deleted unrelated record that no model hash shows (AppWorld's ORM never saw it):
    the judge works out from the change log which tables to compare, and finds it."""
    evaluation = judge_gold_plus(session, [("DELETE FROM payment_requests WHERE id IN (SELECT min(id) FROM "
                                            "payment_requests)", [], False)])
    assert not evaluation.success
    assert any("no app data changed" in failure for failure in evaluation.failures)


def children(parent):
    """{pid: (uid, VmSize in kB)} of the live processes whose parent is `parent`."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                status = (entry / "status").read_text()
                if f"\nPPid:\t{parent}\n" in status:
                    size = status.split("\nVmSize:")[1].split()[0] if "\nVmSize:" in status else "0"
                    found[int(entry.name)] = (int(status.split("\nUid:")[1].split()[0]), int(size))
        except (OSError, IndexError, ValueError):
            pass
    return found


def judge_recorded_sql(session, statement):
    """Record `statement` in the open task (as if its code had made the change), evaluate while watching the
    zygote's other children (the judge); returns (evaluation, seconds, {judge pid: (uid, largest VmSize kB)})."""
    import threading
    out = session.execute("import os\nmodels = os.sys.modules['appworld.apps.venmo.models']\n"
                          f"models.SQLModel.db.tracker.changes.append(({statement!r}, [], False))")
    assert not out.error, out.output
    zygote, task, judges, box = session.process.pid, session.task_pid, {}, {}
    thread = threading.Thread(target=lambda: box.setdefault("evaluation", session.evaluate()), daemon=True)
    started = time.monotonic()
    thread.start()
    while thread.is_alive() and time.monotonic() - started < 120:
        for pid, (uid, size) in children(zygote).items():
            if pid != task:
                judges[pid] = (uid, max(size, judges.get(pid, (0, 0))[1]))
        time.sleep(0.02)
    thread.join(1)
    return box.get("evaluation"), time.monotonic() - started, judges


def test_6_the_judge_is_unprivileged_and_time_limited(mini_world, unchanged_world):
    endless = ("DELETE FROM payment_requests WHERE id = (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 "
               "FROM c) SELECT max(x) FROM c)")
    with world.WorldSession(mini_world, timeout=5, grace=5, start_timeout=60, judge_timeout=10) as session:
        session.open(NEXT)
        evaluation, seconds, judges = judge_recorded_sql(session, endless)
    assert evaluation is not None and not evaluation.success
    assert seconds < 10 + 5 + 10  # judge_timeout + grace + slack, not the start timeout
    assert judges and all(uid != 0 for uid, _ in judges.values())  # it ran as a uid of its own


def test_6_the_judge_memory_is_capped(mini_world, unchanged_world):
    growing = ("UPDATE users SET last_name = (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
               "SELECT group_concat(printf('%.1000c', 'x'), '') FROM c) WHERE id = 1")
    cap = 1536
    with world.WorldSession(mini_world, timeout=5, grace=5, max_memory_mb=cap, judge_timeout=10) as session:
        session.open(NEXT)
        evaluation, seconds, judges = judge_recorded_sql(session, growing)
    assert evaluation is not None and not evaluation.success and seconds < 10 + 5 + 10
    assert judges and all(size <= cap * 1024 for _, size in judges.values())


def test_7_a_task_cannot_outlive_its_session(mini_world):
    """Agent code clears its signal to die with the zygote and will not exit at the end of its channel; the
    zygote then dies. Closing the session must still leave no process behind."""
    code = ("import os\nlibc = os.sys.modules['ctypes'].CDLL(None)\n"
            "print(libc.prctl(1, 0, 0, 0, 0))\n"  # PR_SET_PDEATHSIG, 0
            "pause = getattr(os.sys.modules['time'], 'sle' + 'ep')\n"
            "setattr(os.sys.modules['os'], '_exit', lambda status: pause(10 ** 6))")
    session = world.WorldSession(mini_world, timeout=5, grace=5)
    task_pid = None
    try:
        session.open(NEXT)
        task_pid = session.task_pid
        out = session.execute(code)
        assert not out.error, out.output
        assert out.output.strip() == "-1"  # refused by seccomp
        os.kill(session.process.pid, signal.SIGKILL)
        session.process.wait()
        session.close()
        deadline = time.monotonic() + 10
        while running(task_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(task_pid)
    finally:
        if task_pid and running(task_pid):
            _kill_quietly(task_pid)


@pytest.mark.parametrize("argument", ["'simple'", "'simple', x'4141414141414141'"])
def test_8_the_judge_refuses_fts3_tokenizer(session, argument, unchanged_world):
    """fts3_tokenizer returns (one argument) or installs (two) a pointer the judge's SQLite would call through."""
    evaluation = judge_gold_plus(session, [(f"UPDATE users SET last_name = fts3_tokenizer({argument}) "
                                            "WHERE id = 1", [], False)])
    assert not evaluation.success
    assert "not authorized" in evaluation.failures[0]


def test_9_io_uring_is_refused(session, unchanged_world):
    code = ("import os\nctypes = os.sys.modules['ctypes']\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "params = ctypes.create_string_buffer(120)\n"
            "print(libc.syscall(425, 8, params), ctypes.get_errno())")  # io_uring_setup(8 entries, params)
    session.open(NEXT)
    out = session.execute(code)
    assert out.output.split() == ["-1", "1"], out.output  # EPERM


def test_10_without_root_agent_code_is_refused_unless_asked_for(mini_world):
    """Run as another user (here: root in a user namespace of its own, which is uid 65534 and cannot chroot or
    change uid), a session refuses to start with one line; the unsafe setting runs with one warning line."""
    probe = ("import sys, world\nsession = world.WorldSession(sys.argv[1], timeout=10)\n"
             "try:\n    session.open('notecount_1')\n    print('opened')\nfinally:\n    session.close()\n")
    command = ["unshare", "--user", sys.executable, "-c", probe, str(mini_world)]
    unsafe_setting = "PROST_UNSAFE_WEAK_SANDBOX"  # the documented name
    env = {k: v for k, v in os.environ.items() if k != unsafe_setting}
    env["PYTHONPATH"] = str(Path(world.__file__).parent)
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0 and "opened" not in refused.stdout
    assert "world.py: refusing to run agent code without a chroot and a uid of its own" in refused.stderr
    unsafe = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**env, unsafe_setting: "1"})
    assert unsafe.returncode == 0 and unsafe.stdout.strip() == "opened", unsafe.stderr
    assert [line for line in unsafe.stderr.splitlines() if "world.py" in line][0].startswith("world.py: warning")


def test_10_gold_collection_still_runs_without_root(mini_world, tmp_path):
    """Our own gold solutions are not a model's code: collecting them needs no root (and says so in one line)."""
    collect = ("import sys, agents, rollout\nroot, out = sys.argv[1:]\n"
               "summary = rollout.collect(rollout.teacher_system('gold', root=root), 'train', out, agents.Budgets(),"
               " root=root, workers=1, limit=1)\nprint(len(summary.kept))")
    env = {k: v for k, v in os.environ.items() if k != "PROST_UNSAFE_WEAK_SANDBOX"}
    env["PYTHONPATH"] = str(Path(world.__file__).parent)
    done = subprocess.run(["unshare", "--user", sys.executable, "-c", collect, str(mini_world),
                           str(tmp_path / "train.jsonl")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "1", done.stderr
    assert "world.py: warning: code runs without" in done.stderr
