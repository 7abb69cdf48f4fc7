"""Training fast paths on the data side: the same loss terms and gradients from fewer computed tokens.

Where this sits in ProST: prost.py trains each epoch's examples (data.py: the schedule picks them,
data.plan_batches groups them by length, data.collate pads them). With these fast paths on (the default;
prost.py's `--plain` turns them all off, `--no-merge-nested` and `--no-trunks` one each), three things change:

- Nested examples are merged (`merge_nested_examples`): an example whose tokens begin a longer example of the
  same conversation (a planner's earlier decisions) is trained inside that longer one, its context computed
  once instead of twice.
- A micro-batch's shared trunk is computed once (`trunk_length`, `collate_with_trunk`, `run_trunk`): when
  every row starts with the same tokens (one task's executor examples share the system prompt and the task),
  those columns run as one row and every row attends to their keys and values (trunk.SharedTrunk).
- Micro-batches keep one task's examples side by side (`plan_batches_by_task`) where that computes fewer
  FLOPs, padding included, than the plan by length (`plan_for_trunks`, `padded_batch_flops`).

Each is tested equal to the plain path it replaces (tests/test_batching.py, tests/test_prost.py).
`trunk_batch_train_flops` counts what a micro-batch with a trunk runs, by model.train_flops's rule.
"""

from __future__ import annotations

from dataclasses import replace

import data
from data import Batch, Example
from model import ModelConfig, train_flops
from trunk import SharedTrunk

MIN_TRUNK = 16  # shortest shared prefix worth a pass of its own (each pass costs a few ms of fixed work)


# ----------------------------------------------------------------------------------------------------
# Nested examples.

def merge_nested_examples(examples: list[Example]) -> list[Example]:
    """Fold every example that is an exact token prefix of a longer example of the same conversation into
    that longer one: the longer sequence carries both sets of targets (the union of the masks) and the
    prefix is dropped. Order is kept; a merged sequence stands where its longest member stood.

    Why this is exact: under causal attention, position t sees only tokens 0..t, at the same RoPE
    positions in both sequences. If A.ids == B.ids[:len(A)], each of A's positions computes the same
    logits inside B as in A alone, so every loss term of A's targets is the same function of the weights
    inside B, and so is its gradient. The sum of token losses over the step, and its gradient, are those
    of the separate examples; A's context is just computed once instead of twice. The loss is a mean over
    target tokens, so each target must still count once: A is folded only when none of its targets is a
    target of B already (a planner's earlier decisions are context, not targets, in its later examples),
    so the union holds exactly the target tokens of the separate examples. Examples that are not exact
    prefixes (truncated or fitted differently) stay as they are.
    """
    merged = list(examples)
    dropped: set[int] = set()
    groups: dict[tuple[str, str, int], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault((e.task_id, e.role, e.conversation), []).append(i)
    for members in groups.values():
        by_length = sorted(members, key=lambda i: merged[i].n_tokens)
        for pos, i in enumerate(by_length):
            a = merged[i]
            for j in by_length[pos + 1:]:
                b = merged[j]
                if b.ids[:a.n_tokens] == a.ids and not any(x and y for x, y in zip(a.mask, b.mask)):
                    union = [x | y for x, y in zip(a.mask, b.mask)] + b.mask[a.n_tokens:]
                    merged[j] = replace(b, mask=union)
                    dropped.add(i)
                    break  # the longer sequence is visited later and folds on into a still longer one
    return [e for i, e in enumerate(merged) if i not in dropped]


# ----------------------------------------------------------------------------------------------------
# Shared trunks.

def trunk_length(examples: list[Example]) -> int:
    """How many leading tokens a micro-batch computes once for all its rows (trunk.SharedTrunk): the longest
    prefix every example has in common, cut so that no target is predicted from inside it (token t is
    predicted at position t - 1, and the trunk's positions produce no logits). 0 for a single example or a
    shared prefix shorter than MIN_TRUNK."""
    if len(examples) < 2:
        return 0
    first, n = examples[0].ids, min(e.n_tokens for e in examples)
    for e in examples[1:]:
        n = next((t for t in range(n) if e.ids[t] != first[t]), n)
    first_target = min((e.mask.index(1) for e in examples if any(e.mask)), default=n + 1)
    n = min(n, first_target - 1)
    return n if n >= MIN_TRUNK else 0


def collate_with_trunk(examples: list[Example], pad_id: int) -> Batch:
    """data.collate, and the trunk the rows share (`trunk_length`)."""
    return data.collate(examples, pad_id)._replace(trunk=trunk_length(examples))


def run_trunk(model, ids, trunk: int) -> SharedTrunk:
    """Run the first `trunk` columns of ids (B, T), the same in every row, once as one row; returns the cache
    whose keys and values every row's continuation (ids[:, trunk:]) attends to. Only those keys and values
    are used, and get gradients."""
    cache = SharedTrunk(ids.device)
    model.hidden(ids[:1, :trunk], cache)  # (1, trunk, D), unused: the cache holds what the rows need
    return cache.continuation()


def trunk_batch_train_flops(config: ModelConfig, adapter_weights: int, batch: list[Example], trunk: int) -> float:
    """Model FLOPs of one micro-batch with a shared trunk as the step runs it (model.train_flops, the one
    counting rule): the trunk once, then each row's positions after it up to its last target, attending to
    the trunk's keys; the vocabulary projection at the targets only. Padding and activation recomputation
    are not counted."""
    # the trunk's last layer gets a backward only through its keys and values; the rest of that layer's
    # backward (at most 1 / layers of the trunk's) is counted anyway, as train_flops does for layer 0's input
    total = train_flops(config, trunk + 1, 0, adapter_weights)
    for e in batch:
        total += train_flops(config, e.last_target + 1 - trunk, e.n_targets, adapter_weights, past=trunk)
    return total


# ----------------------------------------------------------------------------------------------------
# Micro-batches planned by task.

def plan_batches_by_task(indices: list[int], lengths: list[int], batch_size: int, seed: int, epoch: int,
                         groups: list, window_batches: int = 64) -> list[list[int]]:
    """data.plan_batches with a window's examples of one group (one key per index, e.g. its task) next to
    each other, groups ordered by their longest member, each group's examples longest first, so a
    micro-batch mostly holds one task's examples, whose shared prefix collate_with_trunk computes once. The
    number of micro-batches is the same as by length."""
    def sort_window(chunk: list[int]) -> list[int]:
        longest: dict = {}
        for i in chunk:
            longest[groups[i]] = max(longest.get(groups[i], 0), lengths[i])
        first = {key: n for n, key in enumerate(dict.fromkeys(groups[i] for i in chunk))}  # ties: shuffled order
        return sorted(chunk, key=lambda i: (-longest[groups[i]], first[groups[i]], -lengths[i]))
    return data.plan_batches(indices, lengths, batch_size, seed, epoch, window_batches, sort_window)


def padded_batch_flops(config: ModelConfig, batch: list[Example]) -> float:
    """FLOPs of one micro-batch's positions as they run, padding included (every row is computed up to the
    batch's last target column), with its shared trunk once: what plan_for_trunks compares plans by.
    The vocabulary projection and the adapter are left out: they cost the same in any plan."""
    trunk = trunk_length(batch)
    width = max(e.last_target for e in batch)
    rows = len(batch) * train_flops(config, width + 1 - trunk, 0, past=trunk)
    return rows + (train_flops(config, trunk + 1, 0) if trunk else 0.0)


def plan_for_trunks(sequences: list[Example], batch_size: int, seed: int, epoch: int,
                    config: ModelConfig) -> list[list[int]]:
    """The plan by length (data.plan_batches), or the one that keeps each task's sequences side by side
    (plan_batches_by_task) when it runs fewer FLOPs, padding and trunks included: for the executor, whose
    examples of one task share a long system prompt and task and have similar lengths, but not for the
    critic, whose examples of one task differ in length more than they share. Either plan has the same
    number of micro-batches."""
    lengths, indices = [e.n_tokens for e in sequences], list(range(len(sequences)))
    by_length = data.plan_batches(indices, lengths, batch_size, seed, epoch)
    by_task = plan_batches_by_task(indices, lengths, batch_size, seed, epoch, [e.task_id for e in sequences])

    def cost(plan):
        return sum(padded_batch_flops(config, [sequences[i] for i in batch]) for batch in plan)
    return by_task if cost(by_task) < cost(by_length) else by_length
