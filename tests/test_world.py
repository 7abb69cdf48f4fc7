"""Tests for world.py: the generated mini-world is judged by AppWorld's own evaluator, and the session API
is judged by what hostile agent code can and cannot do to it.

The world is built once per test session into a temporary root (conftest.py, about 15 s); world sessions
run in worker processes, two at a time.
"""

import json
import re
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pytest

import miniworld
import world

SEED = 0


@pytest.fixture(scope="module")
def pool(world_build):
    root, _ = world_build
    with world.WorldPool(2, root=root, timeout=20) as pool:
        yield pool


def all_task_ids(root):
    return [t for split in ("train", "dev", "test") for t in world.load_split(split, root)]


def expected_answer(root, task_id):
    return json.loads((Path(root) / "data" / "tasks" / task_id / "ground_truth" / "answer.json").read_text())


def run_steps(session, codes):
    """Execute code blocks in the open task; returns the failed outputs."""
    return [out.output for out in map(session.execute, codes) if out.error]


# ---------------------------------------------------------------------------------------------------------
# The generated data root


def test_world_has_the_required_shape(world_build):
    root, summary = world_build
    data = Path(root) / "data"
    splits = {s: world.load_split(s, root) for s in ("train", "dev", "test")}
    scenario_of = world.scenario_of
    train_scenarios = {scenario_of(t) for t in splits["train"]}
    assert {scenario_of(t) for t in splits["dev"]} == train_scenarios  # dev: held-out variants, same scenarios
    assert not set(splits["train"]) & set(splits["dev"])
    assert not {scenario_of(t) for t in splits["test"]} & train_scenarios  # test: unseen scenarios
    assert len(train_scenarios) + len({scenario_of(t) for t in splits["test"]}) >= 20
    variants = {}
    for task_id in sum(splits.values(), []):
        assert re.fullmatch(r"[a-z0-9]+_[0-9]+", task_id)
        variants.setdefault(scenario_of(task_id), set()).add(task_id)
    assert min(map(len, variants.values())) >= 5
    assert len(summary["apps"]) >= 5 and summary["multi_app_tasks"] > 0
    difficulties, sizes, kinds = set(), set(), set()
    for task_id in sum(splits.values(), []):
        specs = json.loads((data / "tasks" / task_id / "specs.json").read_text())
        assert set(specs["supervisor"]) == {"first_name", "last_name", "email", "phone_number"}
        assert specs["db_version"] == "0.1.0" and specs["instruction"]
        meta = world.task_metadata(task_id, root)
        difficulties.add(meta["difficulty"])
        gold = miniworld.gold_subtasks(task_id, root)
        sizes.add(len(gold))
        assert all(step["text"] and step["code"] for step in gold)
        assert "complete_task" in gold[-1]["code"]
        kinds.add(expected_answer(root, task_id) is None)
    assert difficulties == {1, 2, 3} and min(sizes) >= 2 and max(sizes) <= 8
    assert kinds == {True, False}  # questions and state changes
    # variants of one scenario go to different people (so values and answers differ)
    for ids in variants.values():
        people = {json.loads((data / "tasks" / t / "specs.json").read_text())["supervisor"]["email"] for t in ids}
        assert len(people) == len(ids)


def test_select_tasks_keeps_whole_scenarios_in_split_order(world_build):
    root, _ = world_build
    train, dev = world.load_split("train", root), world.load_split("dev", root)
    first_three = list(dict.fromkeys(t.split("_")[0] for t in train))[:3]  # by hand, from the split files
    picked = world.select_tasks("dev", root, scenarios=3)
    assert picked == [t for t in dev if t.split("_")[0] in first_three]  # dev's held-out variants of them
    assert len(picked) == 2 * 3  # the mini-world holds out two variants of each training scenario
    trained = [t for t in train if t.split("_")[0] in first_three]
    assert world.select_tasks("train", root, scenarios=3, limit=5) == trained[:5]
    assert world.select_tasks("dev", root) == dev
    for bad in ({"scenarios": 0}, {"limit": 0}):
        with pytest.raises(ValueError, match="must be at least 1"):
            world.select_tasks("dev", root, **bad)


def test_reading_errors_are_clear(world_build, tmp_path):
    root, _ = world_build
    with pytest.raises(FileNotFoundError, match="no split 'nope'"):
        world.load_split("nope", root)
    with pytest.raises(FileNotFoundError, match="unknown task"):
        world.task_metadata("nosuch_1", root)
    with pytest.raises(FileNotFoundError, match="miniworld.py build"):
        world.load_split("train", tmp_path)
    fake = tmp_path / "data" / "tasks" / "real_1"  # a task in AppWorld's own data has no gold sub-tasks
    (fake / "ground_truth").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="only in the prost mini-world"):
        miniworld.gold_subtasks("real_1", tmp_path)
    with pytest.raises(ValueError, match="not a prost mini-world"):  # never overwrite a real download
        miniworld.build_world(tmp_path)
    assert fake.is_dir()


def test_cli_show_and_clear_errors(world_build, tmp_path, capsys):
    root, _ = world_build
    assert miniworld.main(["show", "payfriend_1", "--root", str(root)]) == 0
    shown = capsys.readouterr().out
    assert "[1] Get my Venmo password" in shown and "apis.venmo.create_transaction(" in shown
    (tmp_path / "data" / "base_dbs").mkdir(parents=True)  # someone else's data root
    assert miniworld.main(["build", "--root", str(tmp_path)]) == 2
    assert miniworld.main(["show", "nosuch_1", "--root", str(root)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------------------------------------------------
# Gold solutions, no-ops and wrong answers, judged by AppWorld's evaluator


@lru_cache(maxsize=1)
def population():
    return miniworld.make_population(SEED)


def plausible_wrong_answer(answer):
    if isinstance(answer, (int, float)):
        return answer + 1
    if answer.isdigit():  # a phone number: one digit off
        return answer[:-1] + str((int(answer[-1]) + 1) % 10)
    return next(song.title for song in population().songs if song.title != answer)  # another real song title


def gold_noop_and_wrong_answer(session, task_id):
    """In one opened world: evaluate untouched (a no-op), run the gold sub-tasks one by one, evaluate;
    for questions, then re-answer with a plausible wrong answer and evaluate again."""
    session.open(task_id)
    noop = session.evaluate()
    errors = run_steps(session, [step["code"] for step in miniworld.gold_subtasks(task_id, session.root)])
    gold = session.evaluate()
    wrong = None
    answer = expected_answer(session.root, task_id)
    if answer is not None:
        session.execute(f"apis.supervisor.complete_task(answer={plausible_wrong_answer(answer)!r})")
        wrong = session.evaluate()
    return task_id, noop, errors, gold, wrong


def test_every_gold_solution_passes_and_doing_nothing_fails(world_build, pool):
    root, _ = world_build
    results = pool.map(gold_noop_and_wrong_answer, all_task_ids(root))
    assert len(results) == sum(world_build[1]["tasks"].values())
    failures = [(t, errors, gold.failures, gold.traces) for t, _, errors, gold, _ in results
                if errors or not gold.success]
    assert not failures, failures[:3]
    assert not [t for t, noop, *_ in results if noop.success]
    assert all(gold.num_tests == len(gold.passes) >= 1 for _, _, _, gold, _ in results)
    questions = [(t, wrong) for t, *_, wrong in results if wrong is not None]
    assert questions and not [t for t, wrong in questions if wrong.success]


# A plausible mistake for one variant of each state-change scenario: the gold code with one edit.
WRONG_EDITS = {
    "payfriend": (r"amount=(\d+\.\d+)", lambda m: f"amount={float(m.group(1)) + 1}"),  # off by a dollar
    "newplaylist": (r">= (\d{4})", lambda m: ">= 1900"),  # forgot the year filter
    "savetolibrary": (r"if song_id not in library_ids:", lambda m: "if song_id in library_ids:"),
    "settlerequests": (r'if request\["amount"\] (<|>=) ',  # approved the big ones, denied the small ones
                       lambda m: 'if request["amount"] ' + {"<": ">=", ">=": "<"}[m.group(1)] + " "),
    "appendnote": (r'"append"', lambda m: '"prepend"'),  # added at the top instead of the end
    "completetodo": (r'if t\["title"\] == ', lambda m: 'if t["title"] != '),  # another task
    "setalarm": (r"repeat_days=\[[^\]]*\]", lambda m: "repeat_days=['monday']"),
    "textgroup": (r"for contact in contacts:", lambda m: "for contact in contacts[1:]:"),  # skipped one
    "tracklist": (r"join\(song_titles\)", lambda m: "join(song_titles[:-1])"),  # lost the last song
    "splitbill": (r"amount=share", lambda m: "amount=share * 2"),
    "remindrequests": (r'about \$\{int', lambda m: "about {int"),  # no dollar sign in the title
    "trimplaylist": (r'\["duration"\] < ', lambda m: '["duration"] > '),  # removed the long ones
    "pintag": (r"pinned=True", lambda m: "pinned=False"),
    "reschedule": (r'priority="high"', lambda m: 'priority="medium"'),
    "birthdaygift": (r'c\["birthday"\]\[5:7\] ==', lambda m: 'c["birthday"][5:7] !='),
    "notetotasks": (r"title=item", lambda m: "title=item.upper() + '!'"),
    "followartists": (r"follow_artist\(", lambda m: "unfollow_artist("),  # the opposite action
    "cleardone": (r'if task\["is_completed"\]:', lambda m: 'if not task["is_completed"]:'),  # deleted open ones
    "helperthanks": (r'join\(titles\)', lambda m: "join(titles[::-1] + ['Buy snacks'])"),
}


# Other correct ways to do a task, also as one edit of the gold code: they must pass too.
EQUIVALENT_EDITS = {
    "tracklist": (r'"\\n"\.join\(song_titles\)', lambda m: '"\\n".join(f"{i}. {t}" for i, t in enumerate(song_titles, 1))'),
    "appendnote": (r'added_content="\\n- ', lambda m: 'added_content="\\n'),  # no bullet
    "newplaylist": (r"for song_id in recent_ids:", lambda m: "for song_id in reversed(recent_ids):"),
    "venmosent": (r"answer=total\)", lambda m: 'answer=f"{total:.2f}")'),  # the total as text, "161.50"
}


def edited_gold(session, task_id, edits):
    pattern, edit = edits[task_id.split("_")[0]]
    codes = [step["code"] for step in miniworld.gold_subtasks(task_id, session.root)]
    edited = [re.sub(pattern, edit, code) for code in codes]
    assert edited != codes, f"the edit for {task_id} matched nothing"
    session.open(task_id)
    errors = run_steps(session, edited)
    return task_id, errors, session.evaluate()


def test_equivalent_solutions_pass(pool):
    results = pool.map(lambda s, t: edited_gold(s, t, EQUIVALENT_EDITS), [f"{name}_3" for name in EQUIVALENT_EDITS])
    assert [(t, errors, ev.failures) for t, errors, ev in results if errors or not ev.success] == []


def skip_main_step(session, task_id):
    """Gold with its last state-changing step left out (every other step, complete_task included)."""
    codes = [step["code"] for step in miniworld.gold_subtasks(task_id, session.root)]
    session.open(task_id)
    run_steps(session, codes[:-2] + codes[-1:])
    return task_id, session.evaluate()


def test_wrong_or_missing_state_changes_fail(world_build, pool):
    root, _ = world_build
    state_scenarios = sorted({t.split("_")[0] for t in all_task_ids(root) if expected_answer(root, t) is None})
    assert set(state_scenarios) == set(WRONG_EDITS)
    wrong = pool.map(lambda s, t: edited_gold(s, t, WRONG_EDITS), [f"{s}_1" for s in state_scenarios])
    assert not [(t, ev.passes) for t, _, ev in wrong if ev.success]
    missing = pool.map(skip_main_step, [f"{s}_2" for s in state_scenarios])
    assert not [(t, ev.passes) for t, ev in missing if ev.success]


# ---------------------------------------------------------------------------------------------------------
# The session API against hostile code


@contextmanager
def tuned(session, **limits):
    """Temporarily change a session's limits (they are plain attributes, read at every call)."""
    saved = {name: getattr(session, name) for name in limits}
    for name, value in limits.items():
        setattr(session, name, value)
    try:
        yield session
    finally:
        for name, value in saved.items():
            setattr(session, name, value)


def test_hostile_code_never_breaks_the_session(world_build, pool, tmp_path):
    root, _ = world_build
    timeout, grace = 1, 2
    session = pool.sessions[0]  # one of the pool's workers; the pool is idle between tests
    with tuned(session, timeout=timeout, grace=grace, max_output_chars=2_000):
        session.open("payfriend_1")
        assert session.execute("marker = 41 + 1").error is False

        def still_works():
            out = session.execute("print(marker)")
            assert (out.output.strip(), out.error) == ("42", False)

        started = time.monotonic()
        out = session.execute("while True:\n    pass")
        assert out.error and "timed out" in out.output and time.monotonic() - started < timeout + grace
        still_works()
        out = session.execute("raise ValueError('boom')")
        assert out.error and "ValueError: boom" in out.output
        still_works()
        out = session.execute("hoard = bytearray(8 * 2**30)")  # beyond the worker's address-space cap
        assert out.error and "MemoryError" in out.output
        still_works()
        out = session.execute("print('x' * 3_000_000)")
        assert len(out.output) < 2_200 and "characters truncated" in out.output
        still_works()
        target = tmp_path / "pwned"
        out = session.execute(f"import os\nos.system('touch {target}')")
        assert out.error and not target.exists()
        still_works()
        out = session.execute("import subprocess\nsubprocess.run(['true'])")
        assert out.error and "subprocess" in out.output
        still_works()
        # A loop inside C code, where AppWorld's alarm cannot reach: the worker is killed after timeout + grace;
        # the next call restarts it and replays the earlier code (marker is back).
        started = time.monotonic()
        out = session.execute("sum(range(10 ** 15))")
        assert out.error and "restarted" in out.output and time.monotonic() - started < timeout + grace + 2
        still_works()
        session.process.kill()  # a worker that dies on its own
        session.process.wait()
        out = session.execute("print(marker)")
        assert out.error and "died" in out.output
        still_works()
    # The gold solution still completes the task in the recovered world, under the default limits: its
    # login and payment calls are not what the 1-second timeout above tests, and on a loaded 2-core machine
    # they can take longer than that (a fresh-clone CI run failed here so).
    for step in miniworld.gold_subtasks("payfriend_1", root):
        assert not session.execute(step["code"]).error
    assert session.evaluate().success


def test_wall_budget_stops_execution(world_build, pool):
    session = pool.sessions[0]
    with tuned(session, budget_seconds=1.0):
        session.open("notecount_1")
        assert not session.execute("x = 1").error
        time.sleep(1.1)
        out = session.execute("print(x)")
        assert out.error and "budget" in out.output
        info = session.open("notecount_2")  # a new task gets a new budget
        assert info.task_id == "notecount_2" and not session.execute("y = 2").error
    with pytest.raises(RuntimeError, match="no open task"):
        world.WorldSession(world_build[0]).execute("x = 1")


def test_open_reports_what_the_agent_sees(world_build, pool):
    root, _ = world_build
    specs = json.loads((Path(root) / "data" / "tasks" / "contactphone_1" / "specs.json").read_text())
    session = pool.sessions[0]
    info = session.open("contactphone_1")
    assert info.instruction == specs["instruction"] and info.supervisor == specs["supervisor"]
    assert info.datetime == specs["datetime"] and "phone" in info.apps and "venmo" in info.apps
    with pytest.raises(FileNotFoundError, match="unknown task"):
        session.open("nosuch_1")


# ---------------------------------------------------------------------------------------------------------
# Parallel pool = sequential


def mixed_run(session, task_id):
    """Full gold for odd variants, gold without its last two steps for even ones."""
    codes = [step["code"] for step in miniworld.gold_subtasks(task_id, session.root)]
    if int(task_id.split("_")[1]) % 2 == 0:
        codes = codes[:-2]
    executions, evaluation = world.run_codes(session, task_id, codes)
    return [(e.output, e.error) for e in executions], evaluation.success, evaluation.passes, evaluation.failures


def test_pool_gives_the_same_results_as_sequential_runs(world_build, pool):
    root, _ = world_build
    task_ids = ["likedartist_1", "likedartist_2", "splitbill_1", "splitbill_2", "tododue_3", "reschedule_4"]
    parallel = pool.map(mixed_run, task_ids)
    sequential = [mixed_run(pool.sessions[1], t) for t in task_ids]  # one worker, one task after another
    assert parallel == sequential
    assert {success for _, success, _, _ in sequential} == {True, False}


# ---------------------------------------------------------------------------------------------------------
# Determinism (runs last: it rebuilds the session's world in place)


def test_scenarios_depend_on_the_seed_only():
    first = miniworld.generate_tasks(miniworld.make_population(SEED), SEED)
    again = miniworld.generate_tasks(miniworld.make_population(SEED), SEED)
    other = miniworld.generate_tasks(miniworld.make_population(SEED + 1), SEED + 1)
    assert {k: (v[1], v[2]) for k, v in first.items()} == {k: (v[1], v[2]) for k, v in again.items()}
    assert [v[2].instruction for v in first.values()] != [v[2].instruction for v in other.values()]


def test_rebuild_is_byte_identical(world_build):
    root, _ = world_build
    data = Path(root) / "data"

    def snapshot():
        files = [p for p in data.rglob("*") if p.is_file() and "base_dbs" not in p.parts]
        return {str(p.relative_to(data)): p.read_bytes() for p in files}

    before = snapshot()
    assert miniworld.build_world(root, seed=SEED) == world_build[1]
    after = snapshot()
    assert after.keys() == before.keys()
    assert [name for name in before if before[name] != after[name]] == []
