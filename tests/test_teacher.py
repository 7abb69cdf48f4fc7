"""teacher.py: the gold teacher, checked against independent references: the mini-world's gold sub-tasks
(miniworld.py), AppWorld's own evaluator, and data.py's reader and example builder with a tokenizer built by
the `tokenizers` library (conftest).

The gold train trajectories are collected once for the whole test session (conftest.py's gold_train).
"""

import pytest
from conftest import build_chatml_tokenizer

import data
import miniworld
import model
import teacher
import trajectories
import world


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    return model.Tokenizer.from_pretrained(build_chatml_tokenizer(tmp_path_factory.mktemp("tok")))


def records_by_kind(path, kind):
    return {r["task_id"]: r for r in trajectories.read_trajectories(path) if r["system"]["kind"] == kind}


def target_text(tokenizer, example):
    return tokenizer.decode([t for t, m in zip(example.ids, example.mask) if m])


def test_mistakes_are_realistic_and_fail_at_the_first_api_call():
    login = 'profile = apis.supervisor.show_profile()\ntok = apis.spotify.login(username=p, password=q)'
    assert teacher.mutate_code(login) == login.replace("show_profile", "get_profile", 1)
    paged = "page = apis.spotify.show_playlist_library(access_token=tok, page_index=0)"
    assert teacher.mutate_code(paged) == paged.replace("access_token=", "token=")
    assert teacher.mutate_code("apis.supervisor.complete_task(answer=3)") is None
    assert teacher.mutate_code("x = 1") is None



# ----------------------------------------------------------------------------------------------------
# The gold teacher on the whole train split.

def test_gold_teacher_trajectories_pass_and_follow_the_gold_subtasks(gold_train, mini_world):
    summary, path = gold_train
    train = world.load_split("train", root=mini_world)
    assert summary.failed == [] and sorted(summary.kept) == sorted(train)
    multi, single = records_by_kind(path, "multi"), records_by_kind(path, "single")
    assert sorted(multi) == sorted(single) == sorted(train)
    for task_id, record in multi.items():
        gold = miniworld.gold_subtasks(task_id, root=mini_world)
        assert record["evaluation"]["success"] and record["evaluation"]["failures"] == []
        assert record["budget_stops"] == []
        planner = [c["output"] for c in record["calls"] if c["role"] == "planner"]
        assert planner == [f"Sub-task: {s['text']}" for s in gold] + ["FINISH"]
        assert [s["text"] for s in record["subtasks"]] == [s["text"] for s in gold]
        for k, step in enumerate(gold, start=1):
            last_attempt = max(e["attempt"] for e in record["executions"] if e["subtask"] == k)
            final = [e for e in record["executions"] if e["subtask"] == k and e["attempt"] == last_attempt]
            assert final[-1]["code"].startswith(step["code"]) and not final[-1]["error"]
            assert record["subtasks"][k - 1]["attempts"][-1]["verdict"] == "success"


def test_gold_recovery_examples_show_a_real_error_and_the_corrected_retry(gold_train, chat_tokenizer):
    _, path = gold_train
    records = list(records_by_kind(path, "multi").values())
    recovered = [r for r in records if any(e["error"] for e in r["executions"])]
    assert recovered, "the default recovery share gives some train tasks a mistake"
    examples, _ = data.build_examples(records, "executor", chat_tokenizer, 100_000)
    for record in recovered:
        mistake = next(e for e in record["executions"] if e["error"])
        k = mistake["subtask"]
        # AppWorld's own error for the wrong name (no such API, or the token missing -> 401)
        assert "No API named" in mistake["output"] or "401" in mistake["output"]
        assert [a["verdict"] for a in record["subtasks"][k - 1]["attempts"]] == ["failure", "success"]
        example = next(e for e in examples if e.task_id == record["task_id"] and e.subtask == k)
        targets = target_text(chat_tokenizer, example)
        fixed = next(e for e in record["executions"] if e["subtask"] == k and e["attempt"] == 2)
        assert fixed["code"] in targets and mistake["code"] not in targets
        assert "Done: the sub-task is complete." not in targets  # the premature report is no target


def test_gold_trajectories_rerender_into_every_role(gold_train, chat_tokenizer):
    _, path = gold_train
    records = trajectories.read_trajectories(path)
    multi = [r for r in records if r["system"]["kind"] == "multi"]
    counts = {role: len(data.build_examples(records, role, chat_tokenizer, 100_000)[0]) for role in trajectories.ROLES}
    n_subtasks = sum(len(r["subtasks"]) for r in multi)
    assert counts["planner"] == n_subtasks + len(multi)  # one per decision, FINISH included
    assert counts["executor"] == n_subtasks
    assert counts["critic"] == sum(len(s["attempts"]) for r in multi for s in r["subtasks"])
    assert counts["single"] == n_subtasks
    single, _ = data.build_examples(records, "single", chat_tokenizer, 100_000)
    last = max(single, key=lambda e: e.subtask)
    assert "complete_task" in target_text(chat_tokenizer, last)

