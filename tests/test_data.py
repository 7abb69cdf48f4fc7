"""Tests for data.py: the trajectory format, per-role examples and masks, the schedule, batches.

Trajectories are built by hand here (synthetic conversations in the contract's format); test_prost.py
reuses `synthetic_trajectory`. Most tests use `CharTokenizer`, a ChatML renderer small enough to check by
eye; `test_mask_with_real_tokenizer` renders through model.py's Tokenizer and checks the mask by hand.
"""

import json

import pytest
import torch

import data
import store
import trajectories

# ----------------------------------------------------------------------------------------------------
# Synthetic trajectories.


def conversation_calls(role, conv, system, first_user, turns):
    """Calls of one conversation. turns: (subtask, output, user reply after it or None, train flag)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": first_user}]
    calls = []
    for subtask, output, reply, train in turns:
        calls.append({"role": role, "conversation": conv, "subtask": subtask,
                      "messages": [dict(m) for m in messages], "output": output,
                      "prompt_tokens": 10 * len(messages), "new_tokens": len(output), "flops": 1.0e6,
                      "seconds": 0.01, "train": train})
        messages.append({"role": "assistant", "content": output})
        if reply is not None:
            messages.append({"role": "user", "content": reply})
    return calls


def synthetic_trajectory(task_id="t1", n_subtasks=3, recovery_at=2, words=1):
    """A multi-agent gold-style trajectory: planner decisions 1..K plus 'finished' (K + 1), one executor
    conversation per sub-task (with a marked mistake and its fix at `recovery_at`), one critic
    conversation per attempt. `words` lengthens every output (for length-dependent tests)."""
    pad = " ok" * (words - 1)
    plan_turns = [(k, f"Sub-task {k}: step {k} of {task_id}{pad}", f"Report {k}: done.", True)
                  for k in range(1, n_subtasks + 1)]
    plan_turns.append((n_subtasks + 1, "Task finished.", None, True))
    calls = conversation_calls("planner", 0, "You plan.", f"Task {task_id}", plan_turns)
    critic_conv = 0
    executions, subtasks = [], []
    for k in range(1, n_subtasks + 1):
        turns = []
        attempts = []
        if k == recovery_at:
            turns.append((k, "```python\nprint(apis.bad())\n```", "Error: no such api", False))
            attempts.append({"report": "failed", "verdict": "failure", "reason": "error"})
            executions.append({"subtask": k, "attempt": 1, "code": "print(apis.bad())",
                               "output": "Error: no such api", "error": True})
        turns.append((k, f"```python\nprint({k}){pad}\n```", f"{k}", True))
        turns.append((k, f"Done with {k}.{pad}", None, True))
        calls += conversation_calls("executor", k, "You execute.", f"Do sub-task {k}", turns)
        executions.append({"subtask": k, "attempt": len(attempts) + 1, "code": f"print({k})",
                           "output": f"{k}", "error": False})
        attempts.append({"report": f"Done with {k}.", "verdict": "success", "reason": "output matches"})
        for attempt in attempts:
            verdict = f"{attempt['verdict']}: {attempt['reason']}{pad}"
            calls += conversation_calls("critic", critic_conv, "You judge.", f"Check {k}",
                                        [(k, verdict, None, True)])
            critic_conv += 1
        subtasks.append({"index": k, "text": f"step {k}", "attempts": attempts})
    return {"schema": 2, "task_id": task_id, "split": "train",
            "system": {"kind": "multi", "teacher": "gold",
                       "roles": {r: {"model": "gold", "adapter": None} for r in trajectories.MULTI_AGENT_ROLES},
                       "budgets": {"subtasks": 10}},
            "instruction": f"Task {task_id}", "calls": calls, "executions": executions,
            "subtasks": subtasks, "evaluation": {"success": True, "passes": ["a"], "failures": [],
                                                 "num_tests": 1},
            "budget_stops": []}


class CharTokenizer:
    """A ChatML renderer over characters: 1 = <|im_start|>, 2 = <|im_end|>, 0 = pad, chars from 3 up.
    Its mask follows the contract: assistant content + <|im_end|>, not the newline after it, nothing for
    turns marked "train": False."""
    pad_id, eos_id = 0, 2

    def encode(self, text):
        return [ord(c) + 3 for c in text]

    def decode(self, ids):
        return "".join({0: "<pad>", 1: "<|im_start|>", 2: "<|im_end|>"}.get(i) or chr(i - 3) for i in ids)

    def chat(self, messages, add_generation_prompt=False):
        ids, mask = [], []
        for m in messages:
            target = m["role"] == "assistant" and m.get("train", True)
            head = [1] + self.encode(m["role"] + "\n")
            body = self.encode(m["content"]) + [2]
            ids += head + body + self.encode("\n")
            mask += [0] * len(head) + [int(target)] * len(body) + [0]
        return ids, mask


def target_texts(tokenizer, example):
    """The decoded runs of target tokens, in order."""
    runs, current = [], []
    for token, m in zip(example.ids, example.mask):
        if m:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# ----------------------------------------------------------------------------------------------------
# The file format.


def test_write_then_read_round_trips(tmp_path):
    path = tmp_path / "sub" / "t.jsonl"
    records = [synthetic_trajectory("a"), synthetic_trajectory("b", n_subtasks=1, recovery_at=0)]
    for r in records:
        trajectories.write_trajectory(path, r)
    assert trajectories.read_trajectories(path) == records
    assert trajectories.completed_task_ids(path) == {"a", "b"}
    assert trajectories.completed_task_ids(tmp_path / "missing.jsonl") == set()


def test_torn_last_line_is_skipped_then_repaired(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    trajectories.write_trajectory(path, synthetic_trajectory("a"))
    whole = json.dumps(synthetic_trajectory("b"))
    with open(path, "a") as f:
        f.write(whole[:100])  # a crash mid-write
    assert [r["task_id"] for r in trajectories.read_trajectories(path)] == ["a"]
    assert "t.jsonl:2: skipping a torn last line" in capsys.readouterr().err
    trajectories.write_trajectory(path, synthetic_trajectory("c"))  # the resumed collection appends
    assert [r["task_id"] for r in trajectories.read_trajectories(path)] == ["a", "c"]
    assert path.read_text().count("\n") == 2


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(synthetic_trajectory("a")))
    assert store.repair_torn_tail(path) == 0
    trajectories.write_trajectory(path, synthetic_trajectory("b"))
    assert [r["task_id"] for r in trajectories.read_trajectories(path)] == ["a", "b"]


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


@pytest.mark.parametrize("corrupt, message", [
    (lambda r: r.update(schema=1), "schema: unsupported version 1"),
    (lambda r: r.pop("instruction"), "record: missing field 'instruction'"),
    (lambda r: r["calls"][1].update(role="planer"), "calls[1].role: unknown role 'planer'"),
    (lambda r: r["system"]["roles"].update(single={"model": "m", "adapter": None}),
     "system.roles.single: unknown role 'single'"),
    (lambda r: r["calls"][0].update(subtask=0), "sub-task indices are 1-based"),
    (lambda r: r["calls"][0].update(new_tokens=True), "calls[0].new_tokens: expected int"),
    (lambda r: r["calls"][2]["messages"][2].update(content="edited"), "assistant turn 1 differs"),
    (lambda r: r["calls"][2]["messages"].pop(2), "has 1 assistant turns but is call 3"),
    (lambda r: r["calls"][2]["messages"][2].update(train=False), "flags belong to calls"),
    (lambda r: r["calls"][0].pop("train"), "calls[0]: missing field 'train'"),
    (lambda r: r["subtasks"][0]["attempts"][0].update(verdict="maybe"), "expected 'success' or 'failure'"),
])
def test_reader_names_file_line_and_problem(tmp_path, corrupt, message):
    bad = synthetic_trajectory("bad")
    corrupt(bad)
    path = tmp_path / "t.jsonl"
    write_lines(path, [synthetic_trajectory("good"), bad])
    with pytest.raises(ValueError) as err:
        trajectories.read_trajectories(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert message in str(err.value)
    with pytest.raises(ValueError, match="malformed"):
        trajectories.write_trajectory(tmp_path / "other.jsonl", bad)
    assert not (tmp_path / "other.jsonl").exists()


def test_reader_rejects_non_json_and_missing_files(tmp_path):
    path = tmp_path / "t.jsonl"
    write_lines(path, ["{not json", synthetic_trajectory()])
    with pytest.raises(ValueError, match=r"t.jsonl:1: not valid JSON"):
        trajectories.read_trajectories(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trajectories.read_trajectories(tmp_path / "nope.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="cannot read trajectory file"):
        trajectories.read_trajectories(tmp_path / "binary.jsonl")


# ----------------------------------------------------------------------------------------------------
# Examples and masks.


def examples_of(role, records=None, max_seq_len=10_000):
    records = records or [synthetic_trajectory()]
    examples, report = data.build_examples(records, role, CharTokenizer(), max_seq_len)
    return examples, report


def test_planner_example_per_decision_targets_only_that_decision():
    examples, report = examples_of("planner")
    assert [e.subtask for e in examples] == [1, 2, 3, 4]  # K = 3 decisions + "finished"
    assert not report.lines()
    tok = CharTokenizer()
    for e in examples:
        expected = "Task finished." if e.subtask == 4 else f"Sub-task {e.subtask}: step {e.subtask} of t1"
        assert target_texts(tok, e) == [expected + "<|im_end|>"]
    # The context of the k-th decision holds the earlier decisions and reports, and ends on the decision.
    text = tok.decode(examples[2].ids)
    assert "Sub-task 1" in text and "Report 2: done." in text and "Report 3" not in text
    assert text.endswith("step 3 of t1<|im_end|>\n")


def test_executor_targets_skip_the_marked_mistake():
    examples, _ = examples_of("executor")
    assert [(e.conversation, e.subtask) for e in examples] == [(1, 1), (2, 2), (3, 3)]
    tok = CharTokenizer()
    recovery = examples[1]
    assert "print(apis.bad())" in tok.decode(recovery.ids)  # the mistake stays in the context ...
    assert target_texts(tok, recovery) == [  # ... but only the fix and the report are learned
        "```python\nprint(2)\n```<|im_end|>", "Done with 2.<|im_end|>"]


def test_critic_one_example_per_attempt():
    examples, _ = examples_of("critic")
    tok = CharTokenizer()
    assert [target_texts(tok, e) for e in examples] == [
        ["success: output matches<|im_end|>"], ["failure: error<|im_end|>"],
        ["success: output matches<|im_end|>"], ["success: output matches<|im_end|>"]]
    assert [e.subtask for e in examples] == [1, 2, 2, 3]


def test_mask_is_exactly_assistant_content_and_im_end_by_hand():
    """One critic example, every token position checked against a hand-written expectation."""
    record = synthetic_trajectory(n_subtasks=1, recovery_at=0)
    (example,), _ = examples_of("critic", [record])
    tok = CharTokenizer()
    expected_ids, expected_mask = [], []
    for role, content, target in [("system", "You judge.", 0), ("user", "Check 1", 0),
                                  ("assistant", "success: output matches", 1)]:
        expected_ids += [1] + tok.encode(role + "\n") + tok.encode(content) + [2] + tok.encode("\n")
        expected_mask += [0] * (1 + len(role) + 1) + [target] * (len(content) + 1) + [0]
    assert example.ids == expected_ids
    assert example.mask == expected_mask
    assert example.n_targets == len("success: output matches") + 1


def test_single_agent_examples_follow_subtasks():
    turns = [(1, "plan: look up", "obs 1", True), (1, "```python\nx\n```", "obs 2", True),
             (2, "wrong", "Error", False), (2, "right", "obs 3", True), (2, "finish", None, True)]
    calls = conversation_calls("single", 0, "You act.", "Task", turns)
    record = synthetic_trajectory()
    record.update(calls=calls, system={"kind": "single", "teacher": "gold",
                                            "roles": {"single": {"model": "m", "adapter": None}},
                                            "budgets": {}})
    trajectories.validate_trajectory(record)
    examples, _ = examples_of("single", [record])
    tok = CharTokenizer()
    assert [e.subtask for e in examples] == [1, 2]
    assert target_texts(tok, examples[0]) == ["plan: look up<|im_end|>", "```python\nx\n```<|im_end|>"]
    assert target_texts(tok, examples[1]) == ["right<|im_end|>", "finish<|im_end|>"]


def test_unknown_role_for_examples():
    with pytest.raises(ValueError, match="unknown role 'judge'"):
        data.build_examples([synthetic_trajectory()], "judge", CharTokenizer(), 100)


def test_fit_messages_shortens_old_outputs_oldest_first_and_keeps_the_rest_whole():
    messages = [{"role": "system", "content": "s" * 50}, {"role": "user", "content": "task " * 40},
                {"role": "assistant", "content": "a" * 300}, {"role": "user", "content": "o" * 400},
                {"role": "assistant", "content": "b" * 300}, {"role": "user", "content": "p" * 400},
                {"role": "assistant", "content": "c" * 300}, {"role": "user", "content": "q" * 400}]

    def count(ms):
        return sum(len(m["content"]) for m in ms)

    assert data.fit_messages(messages, count, 10_000) is messages
    short_o = "o" * 120 + " [... 280 more characters]"  # data.TRUNCATED_KEEP = 120, written out by hand
    fitted = data.fit_messages(messages, count, count(messages) - 200)
    assert fitted == messages[:3] + [{"role": "user", "content": short_o}] + messages[4:]  # only the oldest
    fitted = data.fit_messages(messages, count, count(messages) - 400)
    assert fitted[3]["content"] == short_o and fitted[5]["content"] == "p" * 120 + " [... 280 more characters]"
    assert fitted[7] == messages[7]  # the newest turn is never shortened, even when that means no fit
    assert data.fit_messages(messages, count, count(fitted) - 1) is None
    assert fitted[:3] == messages[:3] and fitted[4] == messages[4] and fitted[6] == messages[6]


def long_report_trajectory():
    """A planner conversation whose reports are long (300 characters), for fitting tests."""
    turns = [(k, f"Sub-task: step {k}", f"Report {k}: " + "r" * 300, True) for k in (1, 2, 3)]
    record = synthetic_trajectory(n_subtasks=3, recovery_at=0)
    record["calls"] = [c for c in record["calls"] if c["role"] != "planner"] + conversation_calls(
        "planner", 0, "You plan.", "Task t1", turns + [(4, "FINISH", None, True)])
    return record


def test_long_examples_are_fitted_by_the_rollout_rule_and_reported():
    record = long_report_trajectory()
    tok = CharTokenizer()
    full, _ = data.build_examples([record], "planner", tok, 10_000)
    finish = full[-1]  # the FINISH decision sees all three long reports
    limit = finish.n_tokens - 150  # shortening the oldest report (310 -> 146 characters) is enough
    examples, report = data.build_examples([record], "planner", tok, limit)
    short = "Report 1: " + "r" * 110 + " [... 190 more characters]"
    expected = [{"role": "system", "content": "You plan."}, {"role": "user", "content": "Task t1"}]
    for k in (1, 2, 3):
        expected += [{"role": "assistant", "content": f"Sub-task: step {k}", "train": False},
                     {"role": "user", "content": short if k == 1 else f"Report {k}: " + "r" * 300}]
    expected.append({"role": "assistant", "content": "FINISH"})
    assert (examples[-1].ids, examples[-1].mask) == tok.chat(expected)
    assert [e.ids for e in examples[:-1]] == [e.ids for e in full[:-1]]  # the short ones are untouched
    (line,) = report.lines()
    assert line.startswith("1 example(s) longer than max_seq_len") and "fitted" in line
    assert f"sub-task 4 ({finish.n_tokens} tokens)" in line

    examples, report = data.build_examples([record], "planner", tok, full[0].n_tokens)
    # only the first decision fits: the others keep the newest report (300 characters) whole
    assert [e.ids for e in examples] == [full[0].ids] and len(report.dropped) == 3
    assert report.lines()[-1].startswith("3 example(s)") and "dropped" in report.lines()[-1]


def test_a_reasked_planner_reply_is_not_a_target():
    turns = [(1, "I think we should look at the profile", "Reply with exactly one line.", False),
             (1, "Sub-task: look at the profile", "Report 1: done.", True), (2, "FINISH", None, True)]
    record = synthetic_trajectory(n_subtasks=1, recovery_at=0)
    record["calls"] = [c for c in record["calls"] if c["role"] != "planner"] + conversation_calls(
        "planner", 0, "You plan.", "Task t1", turns)
    trajectories.validate_trajectory(record)
    examples, _ = examples_of("planner", [record])
    tok = CharTokenizer()
    assert [e.subtask for e in examples] == [1, 2]
    assert target_texts(tok, examples[0]) == ["Sub-task: look at the profile<|im_end|>"]
    assert "I think we should" in tok.decode(examples[0].ids)  # still the context it was re-asked in


def test_a_mistaken_last_turn_is_not_a_target():
    turns = [(1, "```python\nprint(1)\n```", "Error: it failed", True),
             (1, "Done: the sub-task is complete.", None, False)]  # a premature report ends the conversation
    record = synthetic_trajectory(n_subtasks=1, recovery_at=0)
    record["calls"] = [c for c in record["calls"] if c["role"] != "executor"] + conversation_calls(
        "executor", 1, "You execute.", "Do sub-task 1", turns)
    (example,), _ = examples_of("executor", [record])
    tok = CharTokenizer()
    assert target_texts(tok, example) == ["```python\nprint(1)\n```<|im_end|>"]
    assert "Done" not in tok.decode(example.ids)
    only_mistakes = conversation_calls("executor", 1, "You execute.", "Do 1", [(1, "wrong", None, False)])
    record["calls"] = [c for c in record["calls"] if c["role"] != "executor"] + only_mistakes
    assert examples_of("executor", [record])[0] == []  # nothing to learn, no example


def test_a_target_whose_prompt_was_fitted_differently_gets_its_own_example():
    """Four calls of one sub-task; when the fourth ran, the context was fitted by shortening the first
    output turn, which calls 2 and 3 had seen whole: their targets must be trained on the prompts they saw,
    not on the fourth call's view, so the sub-task yields two examples."""
    codes = [f"```python\nprint({v})\n```" for v in "abc"]
    calls = conversation_calls("executor", 1, "You execute.", "Do sub-task 1",
                               [(1, codes[0], "x" * 300, True), (1, codes[1], "y", True), (1, codes[2], "z", True),
                                (1, "Done.", None, True)])
    calls[3]["messages"][3] = {"role": "user", "content": data.shorten("x" * 300, data.TRUNCATED_KEEP)}
    record = synthetic_trajectory(n_subtasks=1, recovery_at=0)
    record["calls"] = [c for c in record["calls"] if c["role"] != "executor"] + calls
    trajectories.validate_trajectory(record)
    examples, _ = examples_of("executor", [record])
    tok = CharTokenizer()
    assert [(e.conversation, e.subtask) for e in examples] == [(1, 1), (1, 1)]
    assert target_texts(tok, examples[0]) == [c + "<|im_end|>" for c in codes]
    assert target_texts(tok, examples[1]) == ["Done.<|im_end|>"]
    for example, targets in zip(examples, [(0, 1, 2), (3,)]):
        for i in targets:  # every target follows exactly the prompt its call saw
            prompt = tok.chat(calls[i]["messages"])[0] + [1] + tok.encode("assistant\n")
            output = tok.encode(calls[i]["output"]) + [2]
            at = len(prompt)
            assert example.ids[:at] == prompt and example.ids[at:at + len(output)] == output
            assert example.mask[at:at + len(output)] == [1] * len(output)


def test_format_example_highlights_targets():
    (example,), _ = examples_of("critic", [synthetic_trajectory(n_subtasks=1, recovery_at=0)])
    shown = data.format_example(CharTokenizer(), example)
    assert shown.splitlines()[0] == f"# t1 critic conversation 0 sub-task 1: {example.n_tokens} tokens, 24 targets"
    assert "⟦success: output matches<|im_end|>⟧\n" in shown
    assert shown.count("⟦") == 1


# ----------------------------------------------------------------------------------------------------
# The schedule.


def schedule_sets(examples, epochs, step, schedule):
    return [sorted({(e.task_id, e.subtask) for i, e in enumerate(examples)
                    if i in data.epoch_example_indices(examples, epoch, step, schedule)})
            for epoch in range(1, epochs + 1)]


def test_progressive_and_full_schedules_on_synthetic_set():
    records = [synthetic_trajectory("a", n_subtasks=2), synthetic_trajectory("b", n_subtasks=3)]
    examples, _ = data.build_examples(records, "planner", CharTokenizer(), 10_000)
    # planner sub-task indices: a -> 1, 2, 3 (finished); b -> 1, 2, 3, 4 (finished); K = 4
    a1, a2, a3, b1, b2, b3, b4 = ("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3), ("b", 4)
    assert schedule_sets(examples, 5, 1, "progressive") == [
        [a1, b1], [a1, a2, b1, b2], [a1, a2, a3, b1, b2, b3], [a1, a2, a3, b1, b2, b3, b4],
        [a1, a2, a3, b1, b2, b3, b4]]
    assert schedule_sets(examples, 3, 3, "progressive") == [
        [a1, a2, a3, b1, b2, b3], [a1, a2, a3, b1, b2, b3, b4], [a1, a2, a3, b1, b2, b3, b4]]
    assert schedule_sets(examples, 2, 1, "full") == [[a1, a2, a3, b1, b2, b3, b4]] * 2
    assert [data.subtasks_in_epoch(e, 4, 1) for e in (1, 2, 3, 4, 5, 9)] == [1, 2, 3, 4, 4, 4]
    assert data.epochs_to_cover(4, 1) == 4 and data.epochs_to_cover(4, 3) == 2
    data.check_coverage(4, 4, 1), data.check_coverage(4, 2, 3), data.check_coverage(4, 1, 1, "full")
    with pytest.raises(ValueError, match=r"reach sub-task 3 of 4, .* use --epochs 4 or more .* --subtasks-per-epoch 2"):
        data.check_coverage(4, 3, 1)  # K = 4 is the FINISH decision: it would never be trained

    plans = data.plan_schedule(examples, 2, 1, "progressive")
    first = [e for e in examples if e.subtask == 1]
    assert (plans[0].n_examples, plans[0].n_targets) == (2, sum(e.n_targets for e in first))
    table = data.format_schedule(plans, "progressive", 1)
    assert table.splitlines()[0] == "schedule: progressive, 1 new sub-task(s) per epoch"
    assert table.splitlines()[2].split()[:3] == ["1", "1..1", "2"]
    with pytest.raises(ValueError, match="unknown schedule"):
        data.subtasks_in_epoch(1, 4, 1, "reverse")


# ----------------------------------------------------------------------------------------------------
# Batching.


def test_batches_are_deterministic_complete_and_longest_first():
    lengths = [5, 50, 7, 49, 6, 48, 8, 100, 9, 10, 11]
    indices = list(range(len(lengths)))
    batches = data.plan_batches(indices, lengths, batch_size=2, seed=3, epoch=1, window_batches=64)
    assert batches == data.plan_batches(indices, lengths, 2, 3, 1, 64)
    assert batches != data.plan_batches(indices, lengths, 2, 3, 2, 64)  # reshuffled per epoch
    assert sorted(i for b in batches for i in b) == indices
    assert 7 in batches[0]  # the 100-token example comes first
    # Within one window, sorting pairs neighbours in length: 100 with 50, 49 with 48, ...
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [
        [5], [6, 7], [8, 9], [10, 11], [48, 49], [50, 100]]


def test_collate_right_pads_and_never_targets_pads():
    examples, _ = examples_of("critic")
    ids, mask, _ = data.collate(examples[:2], pad_id=0)
    width = max(e.n_tokens for e in examples[:2])
    assert ids.shape == mask.shape == (2, width) and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, e in enumerate(examples[:2]):
        assert ids[row, :e.n_tokens].tolist() == e.ids and mask[row].sum().item() == e.n_targets
        assert (ids[row, e.n_tokens:] == 0).all() and not mask[row, e.n_tokens:].any()


def test_mask_with_real_tokenizer_checked_by_hand(tmp_path):
    """Through model.py's Tokenizer (a BPE made by the `tokenizers` library): the targets are exactly the
    critic's verdict and its <|im_end|>; the newline after it and every other token are context."""
    from conftest import build_chatml_tokenizer
    from model import Tokenizer
    tokenizer = Tokenizer.from_pretrained(build_chatml_tokenizer(tmp_path))
    record = synthetic_trajectory(n_subtasks=1, recovery_at=0)
    (example,), _ = data.build_examples([record], "critic", tokenizer, 10_000)
    text = ("<|im_start|>system\nYou judge.<|im_end|>\n<|im_start|>user\nCheck 1<|im_end|>\n"
            "<|im_start|>assistant\nsuccess: output matches<|im_end|>\n")
    assert example.ids == tokenizer.encode(text)
    start = len(tokenizer.encode(text.split("success:")[0]))  # the prefix ends on "\n", a token boundary
    n_targets = len(tokenizer.encode("success: output matches")) + 1
    assert example.mask == [0] * start + [1] * n_targets + [0]
    assert tokenizer.decode(example.ids[start:start + n_targets]) == "success: output matches<|im_end|>"
    assert example.ids[start + n_targets - 1] == tokenizer.im_end_id


def test_cli_checks_and_prints_the_schedule(tmp_path, capsys):
    from conftest import build_chatml_tokenizer
    path = tmp_path / "t.jsonl"
    trajectories.write_trajectory(path, synthetic_trajectory("a", n_subtasks=2))
    assert data.main(["check", str(path)]) == 0
    # planner 3 (2 decisions + finished), executor 2 + 3 (a mistake at sub-task 2), critic 1 + 2
    assert capsys.readouterr().out == f"{path}: 1 valid trajectories, 11 model calls\n"
    tokenizer_dir = build_chatml_tokenizer(tmp_path / "tok")
    assert data.main(["schedule", str(path), "--role", "planner", "--model", str(tokenizer_dir)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[:3] for row in rows[2:]] == [["1", "1..1", "1"], ["2", "1..2", "2"], ["3", "1..3", "3"],
                                                      ["4", "1..3", "3"]]
    assert data.main(["schedule", str(path), "--role", "planner", "--model", str(tokenizer_dir), "--epochs", "2"]) == 2
    assert "reach sub-task 2 of 3, so sub-tasks 3..3 would never be trained; use --epochs 3" in capsys.readouterr().err
    assert data.main(["show", str(path), "--role", "critic", "--model", str(tokenizer_dir)]) == 0
    assert "⟦success: output matches<|im_end|>⟧" in capsys.readouterr().out
    assert data.main(["check", str(tmp_path / "nope.jsonl")]) == 2
    assert "error: trajectory file" in capsys.readouterr().err


def test_trajectory_texts_lists_each_distinct_line_once_in_order(tmp_path, capsys):
    records = [{"calls": [
        {"messages": [{"role": "system", "content": "You plan."}, {"role": "user", "content": "Task: a\nb"}],
         "output": "Sub-task: b"},
        {"messages": [{"role": "system", "content": "You plan."}, {"role": "user", "content": "Task: a\nb"},
                      {"role": "assistant", "content": "Sub-task: b"},
                      {"role": "user", "content": "Report: ok\n\n  \n"}],
         "output": "FINISH"}]}]
    assert data.trajectory_texts(records) == ["You plan.", "Task: a", "b", "Sub-task: b", "Report: ok", "FINISH"]
    path = tmp_path / "t.jsonl"
    trajectories.write_trajectory(path, synthetic_trajectory("a", n_subtasks=1, recovery_at=0))
    assert data.main(["texts", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(set(lines)) and "Task finished." in lines and "You judge." in lines
