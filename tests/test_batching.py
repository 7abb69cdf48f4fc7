"""Tests for batching.py: nested examples merged, shared trunks, micro-batches planned by task.

Each fast path is checked here on its own terms (what it merges, how long a trunk is, how a plan groups);
tests/test_prost.py checks that training with them gives the plain loop's losses and gradients.
"""

import batching
import data
from test_data import CharTokenizer, examples_of, synthetic_trajectory, target_texts

# ----------------------------------------------------------------------------------------------------
# Micro-batches.


def test_grouped_batches_keep_a_tasks_examples_together_in_as_many_batches():
    """groups = each example's task: a window's examples of one task are neighbours (so a micro-batch holds
    one task's examples where it can), the task with the longest example first, each task's examples
    longest first, and there are as many batches as plain length sorting makes (the schedule's step
    counts must not change)."""
    lengths = [30, 10, 31, 11, 12, 90, 13, 14]
    tasks = ["a", "b", "a", "b", "b", "c", "b", "a"]
    indices = list(range(len(lengths)))
    batches = batching.plan_batches_by_task(indices, lengths, 2, 3, 1, tasks)
    assert batches == batching.plan_batches_by_task(indices, lengths, 2, 3, 1, tasks)
    assert len(batches) == len(data.plan_batches(indices, lengths, 2, 3, 1)) == 4
    assert sorted(i for b in batches for i in b) == indices
    # by hand: one window ordered c (90) | a (31, 30, 14) | b (13, 12, 11, 10), cut into pairs
    assert sorted([lengths[i] for i in b] for b in batches) == [[11, 10], [13, 12], [30, 14], [90, 31]]
    assert batches[0] == [5, 2]  # the longest batch first


def test_trunk_is_the_common_prefix_before_the_first_predicted_target(monkeypatch):
    """By hand: rows share their first 6 tokens; a target at column 5 is predicted from position 4, so the
    trunk (whose positions give no logits) stops at 4. Shorter than MIN_TRUNK, a lone row, no common
    token, or switched off: no trunk."""
    def example(ids, first_target):
        return data.Example("t", "executor", 0, 1, ids, [int(i >= first_target) for i in range(len(ids))])
    monkeypatch.setattr(batching, "MIN_TRUNK", 2)
    a = example([1, 2, 3, 4, 5, 6, 7, 8], 7)
    b = example([1, 2, 3, 4, 5, 6, 9, 9, 9], 6)
    c = example([1, 2, 3, 4, 5, 6, 7], 5)
    assert batching.trunk_length([a, b]) == 5  # common prefix 6, first target 6: positions 0..4
    assert batching.trunk_length([a, b, c]) == 4
    assert batching.trunk_length([a]) == 0
    assert batching.trunk_length([a, example([9, 2, 3, 4, 5, 6, 7, 8], 7)]) == 0
    assert batching.collate_with_trunk([a, b, c], pad_id=0).trunk == 4 and data.collate([a, b, c], 0).trunk == 0
    monkeypatch.setattr(batching, "MIN_TRUNK", 5)
    assert batching.trunk_length([a, b]) == 5 and batching.trunk_length([a, b, c]) == 0


# ----------------------------------------------------------------------------------------------------
# Nested examples.


def test_merging_folds_a_planners_decisions_into_its_longest_example():
    tok = CharTokenizer()
    examples, _ = examples_of("planner", [synthetic_trajectory("a", n_subtasks=3),
                                          synthetic_trajectory("b", n_subtasks=2)])
    merged = batching.merge_nested_examples(examples)
    # one sequence per trajectory's planner conversation: its longest example, carrying every decision
    assert [(e.task_id, e.subtask) for e in merged] == [("a", 4), ("b", 3)]
    a_examples = [e for e in examples if e.task_id == "a"]
    assert merged[0].ids == a_examples[-1].ids
    assert target_texts(tok, merged[0]) == [t for e in a_examples for t in target_texts(tok, e)]
    assert sum(e.n_targets for e in merged) == sum(e.n_targets for e in examples)
    # executors: one conversation per sub-task, nothing is a prefix of anything else
    executor, _ = examples_of("executor")
    assert batching.merge_nested_examples(executor) == executor


def test_merging_keeps_non_prefixes_and_shared_targets_apart():
    examples, _ = examples_of("planner")
    first, second = examples[0], examples[1]
    cut = data.Example(first.task_id, "planner", 0, 1, first.ids[1:], [0] + first.mask[2:])  # truncated
    other_conv = data.Example(first.task_id, "planner", 7, 1, list(first.ids), list(first.mask))
    assert batching.merge_nested_examples([cut, second]) == [cut, second]
    assert batching.merge_nested_examples([other_conv, second]) == [other_conv, second]
    # a target of the prefix that is a target of the longer example too would count twice: kept apart
    overlap = data.Example(first.task_id, "planner", 0, 2, list(second.ids),
                           [x | y for x, y in zip(first.mask, second.mask)] + second.mask[first.n_tokens:])
    assert batching.merge_nested_examples([first, overlap]) == [first, overlap]
    [merged] = batching.merge_nested_examples([first, second])
    assert merged.ids == second.ids and merged.n_targets == first.n_targets + second.n_targets
