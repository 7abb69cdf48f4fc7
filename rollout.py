"""Rollouts at scale: many tasks at once, world calls in parallel, model calls batched, and the engines that
answer them fast (LocalEngine over the decoding engine; HttpEngine for a chat endpoint); the command line that
collects teacher trajectories (`python rollout.py collect ...`) or rolls out a trained system (`run`).

Where this sits: agents.py defines the protocol as rollout generators and runs one task at a time with its plain
engine (`agents.run_task`); this file is the fast path beside it. `run_rollouts` drives many rollouts at once:
each round it sends all pending world requests to world sessions (worker processes, called from threads) and
groups all pending model requests by (engine, adapter, stop strings), or by engine alone for one that mixes
adapters, into one batched greedy decoding call each. Rollouts only see their own results, and a LocalEngine in
deterministic mode decodes batch-invariantly (`decoding.generate_invariant`: a call's tokens are the bits it gets
decoded alone), so it records the trajectories the plain driver records whatever --workers and --max-batch are
(tests/test_rollout.py checks it); `--decode batched` differs from it only where a near-tie of two tokens rounds
the other way. teacher.py's gold teacher and evaluate.py's evaluations run on this scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

import agents
import data
import decoding
import lora
import model
import model_io
import store
import trajectories
import world
from agents import BUDGET_HELP, CODE_RE, Budgets, ModelReply, ModelRequest, System, single_engine_system
from teacher import GoldEngine, teacher_rollout

# ----------------------------------------------------------------------------------------------------
# Engines: what answers model requests (agents.System). Besides complete(requests, adapters, budgets) -> replies,
# `mixes_adapters` says whether requests of different adapters may share one call (the scheduler groups by adapter
# otherwise), `batches` whether requests pending together run faster as one call (the scheduler then keeps
# rollouts in step, see run_rollouts).

PROMPT_CACHE_TOKENS = 16384  # default bound of a LocalEngine's prompt cache (SmolLM2-135M fp32: 46 KiB/token)
DETERMINISTIC_CHUNK = 64  # prefill chunk of deterministic decoding: the prompt cache's reuse granularity
PROMPT_LOOKUP = 4  # draft tokens a row verifies per step (deterministic: every row; batched: a row decoding alone)


class LocalEngine(agents.PlainEngine):
    """agents.PlainEngine's model and tokenizer, decoded by the fast decoding engine (decoding.py).

    By default each role's adapter runs merged into its own copy of the weights the adapter changes
    (`lora.merged_copy`; embeddings, norms and the vocabulary projection stay shared): a call then costs exactly
    the base model's FLOPs, and decoding skips the adapter's narrow matmuls. The price is one copy of the adapted
    projections per role (SmolLM2-135M fp32: 425 MB), and calls of different roles run as separate batches. With
    `mix_adapters` the adapters stay unmerged on the one base and each batch row runs its own: calls of every
    role share a batch, at the cost of the adapters' matmuls. All weights are stored the way one-row products
    read fastest (`decoding.lay_out_for_decoding`).

    A prompt cache (per adapter, `prompt_cache_tokens` tokens at most, 0 = off) lets each call compute only the
    prompt tokens no earlier call has computed. `deterministic` decodes the calls of one complete() together but
    batch-invariantly (`decoding.generate_invariant`: prompts prefilled alone in aligned chunks, decode steps on
    products of one fixed shape): a call's tokens then depend on its prompt alone, not on which calls shared its
    batch or what the cache held, so results do not change with --workers or --max-batch. `prompt_lookup`
    drafts that many tokens per step from a row's own context (batched mode: only a row decoding alone; 0 = off).
    """

    def __init__(self, name_or_path: str, device: str = "cpu", dtype: str = "float32",
                 prompt_cache_tokens: int = PROMPT_CACHE_TOKENS, deterministic: bool = False,
                 prompt_lookup: int = PROMPT_LOOKUP, mix_adapters: bool = False):
        super().__init__(name_or_path, device, dtype)
        self.base = decoding.lay_out_for_decoding(self.base)
        self.models: dict[str | None, model.Transformer] = {None: self.base}  # adapter name -> what runs it
        self.prompt_cache = decoding.PromptCache(prompt_cache_tokens) if prompt_cache_tokens else None
        self.deterministic = deterministic
        self.prompt_lookup = prompt_lookup
        self.mixes_adapters = mix_adapters
        self.batches = True

    def load_adapter(self, folder: str, name: str) -> None:
        if self.mixes_adapters:  # unmerged on the base, inactive until a batch routes rows to it
            lora.load_adapter(self.base, folder, name)
            self.models[name] = self.base
            self.adapter_weights[name] = sum(p.numel() for p in lora.adapter_parameters(self.base, name))
        else:  # in eval mode (no adapter dropout); the merged weights are new tensors, laid out like the base's
            self.models[name] = decoding.lay_out_for_decoding(lora.merged_copy(self.base, folder, name))
            self.adapter_weights[name] = 0
        if self.prompt_cache is not None:
            self.prompt_cache.clear()  # keys/values cached under this name may come from other weights

    def complete(self, requests: list[ModelRequest], adapters: list[str | None], budgets: Budgets
                 ) -> list[ModelReply]:
        if not self.mixes_adapters and len(set(adapters)) > 1:
            raise ValueError("this engine runs adapters merged: one adapter per complete() call")
        net = self.models[adapters[0]]
        limit = min(budgets.context, net.config.max_position_embeddings) - budgets.new_tokens
        fitted = [data.fit_messages(r.messages, self.count, limit) for r in requests]
        runnable = [i for i, m in enumerate(fitted) if m is not None]
        replies = [ModelReply("", None) for _ in requests]
        if not runnable:
            return replies
        prompts = [self.tokenizer.chat(fitted[i], add_generation_prompt=True)[0] for i in runnable]
        start = time.perf_counter()
        stop_strings = [requests[i].stop_strings for i in runnable]
        with torch.no_grad():
            if self.deterministic:
                generations = decoding.generate_invariant(
                    net, prompts, budgets.new_tokens, self.tokenizer.stop_ids, self.tokenizer, stop_strings,
                    self.prompt_cache, adapters[0], DETERMINISTIC_CHUNK, self.prompt_lookup)
            else:  # rows of one adapter side by side: each adapter then updates its rows as one slice
                decode = lambda rows: decoding.generate(  # noqa: E731
                    net, [prompts[j] for j in rows], budgets.new_tokens, self.tokenizer.stop_ids,
                    tokenizer=self.tokenizer, stop_strings=[stop_strings[j] for j in rows],
                    prompt_cache=self.prompt_cache, namespace=None if self.mixes_adapters else adapters[0],
                    adapters=[adapters[runnable[j]] for j in rows] if self.mixes_adapters else None,
                    prompt_lookup=self.prompt_lookup)
                order = sorted(range(len(prompts)), key=lambda j: str(adapters[runnable[j]]))
                generations = [g for _, g in sorted(zip(order, decode(order)), key=lambda pair: pair[0])]
        share = (time.perf_counter() - start) / len(runnable)  # each call's share of the batch's time
        for i, g in zip(runnable, generations):
            computed = model.generate_flops(net.config, g.n_prompt, g.n_new, cached=g.n_cached,
                                            adapter_weights=self.adapter_weights[adapters[i]])
            replies[i] = ModelReply(g.text.rstrip(), fitted[i], g.n_prompt, g.n_new,
                                    model.generate_flops(net.config, g.n_prompt, g.n_new), share, g.stop_reason,
                                    cached_tokens=g.n_cached, flops_computed=computed)
        return replies


class HttpEngine:
    """An OpenAI-compatible chat endpoint (POST <base>/v1/chat/completions, temperature 0), stdlib only.
    Token counts and FLOPs are not known for a remote model: they are recorded as 0 (collect can fill
    token counts with the tokenizer of the model being trained). Each request is sent on its own, so pending
    requests of every role can share one complete() call."""

    mixes_adapters = True
    batches = True  # sent concurrently: an endpoint like vLLM batches them

    def __init__(self, url: str, model_name: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 300,
                 count=None, retries: int = 5, backoff: float = 1.0, concurrency: int = 16):
        self.url = chat_completions_url(url)
        self.name = f"{model_name} @ {url}"
        self.model_name = model_name
        self.api_key = os.environ.get(api_key_env, "")
        self.timeout = timeout
        self.retries, self.backoff, self.concurrency = retries, backoff, concurrency
        # Without the trained model's tokenizer, about 4 characters per token decides what fits.
        self.count = count or (lambda messages: sum(len(m["content"]) for m in messages) // 4)

    def complete(self, requests: list[ModelRequest], adapters: list[str | None], budgets: Budgets
                 ) -> list[ModelReply]:
        """All pending requests at once (an endpoint like vLLM batches concurrent requests), replies in order."""
        if len(requests) <= 1:
            return [self.complete_one(r, budgets) for r in requests]
        with ThreadPoolExecutor(max_workers=min(len(requests), self.concurrency)) as threads:
            return list(threads.map(lambda r: self.complete_one(r, budgets), requests))

    def complete_one(self, request: ModelRequest, budgets: Budgets) -> ModelReply:
        messages = data.fit_messages(request.messages, self.count, budgets.context - budgets.new_tokens)
        if messages is None:
            return ModelReply("", None)
        body = {"model": self.model_name, "temperature": 0, "max_tokens": budgets.new_tokens,
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        if request.stop_strings:
            body["stop"] = list(request.stop_strings)
        start = time.perf_counter()
        answer = post_json(self.url, body, self.api_key, self.timeout, self.retries, self.backoff)
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{self.url} answered without choices[0].message.content: "
                             f"{json.dumps(answer)[:200]}") from None
        text = close_code_block(text.rstrip())
        stop_reason = "length" if choice.get("finish_reason") == "length" else "stop_string"
        return ModelReply(text, messages, seconds=time.perf_counter() - start, stop_reason=stop_reason)


def chat_completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


RETRY_STATUS = {429, 500, 502, 503, 504}  # rate limits and overloaded or restarting servers: worth another try


def post_json(url: str, body: dict, api_key: str, timeout: float, retries: int = 0, backoff: float = 1.0) -> dict:
    """POST body as JSON and parse the JSON answer. HTTP 429/5xx and failed connections are retried `retries`
    times, waiting backoff * 2^i seconds (or the server's Retry-After, if shorter than a minute) before try i+1;
    after the last, a ValueError says what the endpoint answered."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    for attempt in range(retries + 1):
        wait = backoff * 2 ** attempt
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as e:
            problem = f"{url} answered HTTP {e.code}: {e.read().decode(errors='replace')[:200]}"
            if e.code not in RETRY_STATUS:
                raise ValueError(problem) from None
            after = e.headers.get("Retry-After", "")
            wait = min(float(after), 60.0) if after.replace(".", "", 1).isdigit() else wait
        except json.JSONDecodeError as e:
            raise ValueError(f"{url} answered something that is not JSON: {e}") from None
        except (urllib.error.URLError, OSError) as e:
            problem = f"cannot use the chat endpoint {url}: {e}"
        if attempt < retries:
            time.sleep(wait)
    raise ValueError(f"{problem} (gave up after {retries + 1} attempts)")


def close_code_block(text: str) -> str:
    """OpenAI-style endpoints drop the stop string; put the closing fence back so the recorded turn has
    the same shape as a local model's."""
    if CODE_RE.search(text) and text.count("```") % 2 == 1:
        return text + "\n```"
    return text


def local_system(kind: str, models: dict[str, str], adapters: dict[str, str | None], device: str = "cpu",
                 dtype: str = "float32", **options) -> System:
    """agents.build_system on LocalEngines; `options`: LocalEngine options (engine_options)."""
    return agents.build_system(kind, models, adapters, lambda base: LocalEngine(base, device, dtype, **options))


# ----------------------------------------------------------------------------------------------------
# The scheduler: many rollouts at once, world calls in parallel, model calls batched.

@dataclass
class RunStats:
    tasks: int = 0
    seconds: float = 0.0  # wall time of the whole run
    startup_seconds: float = 0.0  # of which starting world worker processes (0 with a pool passed in)
    model_seconds: float = 0.0  # time inside engine.complete (the main thread)
    world_seconds: float = 0.0  # time world sessions spent on requests (summed over sessions)
    batch_sizes: list[int] = field(default_factory=list)  # requests per engine.complete call

    def summary(self) -> str:
        per_minute = self.tasks / self.seconds * 60 if self.seconds else 0.0
        mean_batch = sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0
        outside = 1 - self.model_seconds / self.seconds if self.seconds else 0.0
        return (f"{self.tasks} tasks in {self.seconds:.1f} s ({per_minute:.1f} tasks/minute; "
                f"{self.startup_seconds:.1f} s of it starting world workers); "
                f"{len(self.batch_sizes)} model batches, mean size {mean_batch:.2f}, "
                f"max {max(self.batch_sizes, default=0)}; {outside:.0%} of wall time outside the model")


@dataclass
class Slot:
    """One running rollout and the request it is waiting on."""
    rollout: object
    request: object


def timed_world_call(session, request):
    """Answer a world request in the rollout's session (called from a thread); returns (result, seconds)."""
    start = time.perf_counter()
    result = agents.serve_world(session, request)
    return result, time.perf_counter() - start


def serve_models(slots: dict[int, Slot], system: System, budgets: Budgets, max_batch: int,
                 stats: RunStats) -> dict[int, ModelReply]:
    """One engine.complete call per group of pending model requests, in chunks of at most max_batch: a group
    is every request for one engine when it mixes adapters, else those of one (engine, adapter, stop strings)."""
    groups: dict[tuple, list[int]] = {}
    for i, slot in slots.items():
        binding = system.binding(slot.request.role)
        engine = binding.engine
        key = (id(engine),) if engine.mixes_adapters else (id(engine), binding.adapter, slot.request.stop_strings)
        groups.setdefault(key, []).append(i)
    replies = {}
    for members in groups.values():
        engine = system.roles[slots[members[0]].request.role].engine
        for start in range(0, len(members), max_batch):
            chunk = members[start:start + max_batch]
            requests = [slots[i].request for i in chunk]
            began = time.perf_counter()
            answers = engine.complete(requests, [system.roles[r.role].adapter for r in requests], budgets)
            stats.model_seconds += time.perf_counter() - began
            stats.batch_sizes.append(len(chunk))
            replies.update(zip(chunk, answers))
    return replies


def run_rollouts(task_ids: list[str], system: System, budgets: Budgets, *, split: str, root=None,
                 workers: int = 4, max_batch: int = 16, on_trajectory=None, rollout=None,
                 pool=None, session_options: dict | None = None, in_step: bool | None = None) -> RunStats:
    """Roll out every task with `workers` world sessions at once; call on_trajectory(record) as each
    finishes. `rollout(task_id)` makes a rollout generator (default: the system's kind). A running
    world.WorldPool can be passed in (its first `workers` sessions are used, and it stays open).
    `in_step`: whether every world call of a round finishes before the next model calls (default: when an
    engine batches; see below). In step, the order in which tasks finish does not depend on timing."""
    if rollout is None:
        make = agents.multi_agent_rollout if system.kind == "multi" else agents.single_agent_rollout
        described = system.describe(budgets)
        rollout = lambda task_id: make(task_id, budgets, split, described)  # noqa: E731
    stats, queue, active = RunStats(), deque(task_ids), {}
    began = time.perf_counter()
    n = max(1, min(workers, len(task_ids)))
    own_pool = pool is None
    if own_pool:
        pool = world.WorldPool(n, root=root, **(session_options or {}))
        stats.startup_seconds = time.perf_counter() - began
    sessions = pool.sessions[:n]  # a rollout keeps its session from open to evaluate
    in_world: dict[int, Future] = {}  # world calls running, by session
    if in_step is None:
        in_step = any(binding.engine.batches for binding in system.roles.values())
    try:
        with ThreadPoolExecutor(max_workers=len(sessions)) as threads:
            while queue or active:
                for i in range(len(sessions)):
                    if i not in active and queue:
                        generator = rollout(queue.popleft())
                        active[i] = Slot(generator, next(generator))
                waiting = {i: s for i, s in active.items() if isinstance(s.request, ModelRequest)}
                for i, s in active.items():
                    if i not in waiting and i not in in_world:
                        in_world[i] = threads.submit(timed_world_call, sessions[i], s.request)
                # Model calls are served while world calls run. Engines that batch get rounds in step: every
                # world call of a round finishes before the next model calls, which then share batches. Others
                # (each call decoded alone) gain nothing from waiting: a rollout whose world call is still
                # running waits for it, the rest go on, and the scheduler only waits when the model is idle.
                results = serve_models(waiting, system, budgets, max_batch, stats) if waiting else {}
                if in_step or not results:
                    wait(in_world.values(), return_when=ALL_COMPLETED if in_step else FIRST_COMPLETED)
                for i in [i for i, job in in_world.items() if job.done()]:
                    results[i], seconds = in_world.pop(i).result()
                    stats.world_seconds += seconds
                for i in sorted(results):
                    try:
                        active[i].request = active[i].rollout.send(results[i])
                    except StopIteration as finished:
                        del active[i]
                        stats.tasks += 1
                        if on_trajectory is not None:
                            on_trajectory(finished.value)
    finally:
        if own_pool:
            pool.close()
    stats.seconds = time.perf_counter() - began
    return stats


# ----------------------------------------------------------------------------------------------------
# Collecting teacher trajectories for training, and rolling out a system on a split.

def count_tokens(record: dict, tokenizer) -> None:
    """Fill a teacher's calls' token counts with the tokenizer of the model being trained. FLOPs stay
    0: no model of ours ran."""
    for call in record["calls"]:
        call["prompt_tokens"] = len(tokenizer.chat(call["messages"], add_generation_prompt=True)[0])
        call["new_tokens"] = len(tokenizer.encode(call["output"]))


def teacher_system(teacher: str | None, url: str | None = None, url_model: str | None = None,
                   api_key_env: str = "OPENAI_API_KEY", root=None, recovery_share: float = 0.5,
                   device: str = "cpu", dtype: str = "float32", tokenizer=None, engine: dict | None = None
                   ) -> System:
    """The system a teacher runs as: gold, a chat endpoint, or a loadable model, as every role.
    `tokenizer` (of the model being trained) measures an endpoint's prompts against the context budget."""
    if url:
        if not url_model:
            raise ValueError("--teacher-url needs --teacher-model (the model name the endpoint serves)")
        count = None
        if tokenizer is not None:
            count = lambda messages: len(tokenizer.chat(messages, add_generation_prompt=True)[0])  # noqa: E731
        return single_engine_system(HttpEngine(url, url_model, api_key_env, count=count),
                                    teacher=f"{url_model} @ {url}")
    if teacher == "gold":
        return single_engine_system(GoldEngine(root, recovery_share), teacher="gold")
    if not teacher:
        raise ValueError("give a teacher: --teacher gold, --teacher MODEL or --teacher-url URL")
    return single_engine_system(LocalEngine(teacher, device, dtype, **(engine or {})), teacher=teacher)


@dataclass
class CollectSummary:
    kept: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # failed AppWorld's evaluation (dropped unless kept)
    skipped: int = 0  # already in the output file
    stats: RunStats | None = None


def collect(system: System, split: str, out, budgets: Budgets, *, root=None, workers: int = 4,
            max_batch: int = 16, keep_failed: bool = False, limit: int | None = None,
            scenarios: int | None = None, tokenizer=None, pool=None) -> CollectSummary:
    """Roll out the teacher on a split and append the trajectories (multi-agent and single-agent view)
    of tasks that pass evaluation to `out`, a task's two records in one write. Tasks already in `out`
    are skipped (resume). One collection per file at a time (store.OutputLock)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the trajectory file to write, e.g. {out / 'train.jsonl'}")
    store.check_writable(out.parent)
    with store.OutputLock(out, folder=False):
        task_ids = world.select_tasks(split, root, scenarios=scenarios, limit=limit)  # run or not
        done = collected_task_ids(out)
        todo = [t for t in task_ids if t not in done]
        summary = CollectSummary(skipped=len(task_ids) - len(todo))
        multi = system.describe(budgets)
        single = {**multi, "kind": "single", "teacher": f"{system.teacher} (single-agent view)",
                  "roles": {"single": multi["roles"]["executor"]}}

        def keep(records: list[dict]) -> None:
            passed = records[0]["evaluation"]["success"]
            (summary.kept if passed else summary.failed).append(records[0]["task_id"])
            if passed or keep_failed:
                for record in records:
                    if tokenizer is not None:
                        count_tokens(record, tokenizer)
                trajectories.write_trajectories(out, records)  # one write; if a crash tears it, see collected_task_ids

        # in step: trajectories are appended as tasks finish, and training follows the file's order
        gold = {"unsafe_weak_sandbox": True} if system.teacher == "gold" else None  # our code, not a model's
        summary.stats = run_rollouts(todo, system, budgets, split=split, root=root, workers=workers,
                                     max_batch=max_batch, on_trajectory=keep, pool=pool, in_step=True,
                                     session_options=gold,
                                     rollout=lambda t: teacher_rollout(t, budgets, split, multi, single))
    return summary


def collected_task_ids(out: Path) -> set[str]:
    """Tasks whose teacher records are all in `out` (the multi-agent rollout and its single-agent view).
    A task with only one of them (its write was torn by a crash) loses that record here and runs again."""
    if not out.exists():
        return set()
    kinds: dict[str, set[str]] = {}
    for record in trajectories.read_trajectories(out):
        if record["system"].get("teacher") is not None:
            kinds.setdefault(record["task_id"], set()).add(record["system"]["kind"])
    partial = {t for t, k in kinds.items() if k != {"multi", "single"}}
    if partial:
        store.drop_lines(out, lambda r: isinstance(r, dict) and r.get("task_id") in partial)
        print(f"{out}: {len(partial)} task(s) had only part of their records (an interrupted write); "
              f"running them again: {', '.join(sorted(partial))}", file=sys.stderr)
    return trajectories.completed_task_ids(out)


def run(system: System, split: str, out, budgets: Budgets, *, root=None, workers: int = 4,
        max_batch: int = 16, limit: int | None = None, scenarios: int | None = None, pool=None) -> RunStats:
    """Roll out a system on a split, appending every trajectory to `out` (tasks already there are
    skipped)."""
    done = trajectories.completed_task_ids(out)
    todo = [t for t in world.select_tasks(split, root, scenarios=scenarios, limit=limit) if t not in done]
    return run_rollouts(todo, system, budgets, split=split, root=root, workers=workers, max_batch=max_batch,
                        pool=pool, on_trajectory=lambda record: trajectories.write_trajectory(out, record))


# ----------------------------------------------------------------------------------------------------
# Command line.

def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", required=True, help="task split of the world (train, dev, test, ...)")
    parser.add_argument("--out", required=True, help="trajectory file (JSONL) to append to; tasks "
                        "already in it are skipped, so an interrupted run resumes")
    parser.add_argument("--root", default=None, help="APPWORLD_ROOT of the world (default: "
                        "$APPWORLD_ROOT, else the repo's miniworld/)")
    parser.add_argument("--workers", type=int, default=4, help="world sessions (worker processes) "
                        "running tasks at once")
    parser.add_argument("--max-batch", type=int, default=16, help="most model calls batched into one "
                        "generate call")
    parser.add_argument("--scenarios", type=int, default=None, help="only the split's first N scenarios "
                        "(all their variants)")
    parser.add_argument("--limit", type=int, default=None, help="only the split's first N tasks (after --scenarios) "
                        "(a rerun with the same N adds nothing)")
    parser.add_argument("--device", default="cpu", help="torch device for local models")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weight dtype for local models")
    add_decode_flags(parser, "batched")
    add_budget_flags(parser)


def add_budget_flags(parser: argparse.ArgumentParser) -> None:
    """One --max-<name> flag per field of agents.Budgets (rollout.py and evaluate.py)."""
    defaults = Budgets()
    for f in fields(Budgets):
        parser.add_argument(f"--max-{f.name.replace('_', '-')}", dest=f.name, type=int,
                            default=getattr(defaults, f.name),
                            help=f"budget: {BUDGET_HELP[f.name]} (default {getattr(defaults, f.name)})")


def add_decode_flags(parser: argparse.ArgumentParser, default: str) -> None:
    """Flags of how local models decode (rollout.py and evaluate.py; evaluation defaults to deterministic)."""
    parser.add_argument("--decode", choices=("batched", "deterministic"), default=default,
                        help="batched: pending calls share one generate batch, rows padded together (near-ties can "
                        "go either way depending on the batch); deterministic: pending calls share a batch-invariant "
                        "batch (each call's tokens are those it gets decoded alone), so results "
                        f"do not depend on --workers/--max-batch (default: {default})")
    parser.add_argument("--prompt-cache-tokens", type=int, default=PROMPT_CACHE_TOKENS,
                        help="tokens of keys/values kept to reuse across calls (least recently used evicted "
                        f"first; default {PROMPT_CACHE_TOKENS})")
    parser.add_argument("--no-prompt-cache", action="store_true",
                        help="recompute every prompt from scratch (for ablations)")
    parser.add_argument("--prompt-lookup", type=int, default=PROMPT_LOOKUP,
                        help="draft tokens a call decoding alone copies from its own prompt and verifies in one "
                        f"step (0 = off; default {PROMPT_LOOKUP})")
    parser.add_argument("--mix-adapters", action="store_true",
                        help="keep the roles' adapters unmerged on their shared base, so pending calls of every "
                        "role share one batch (needs --decode batched; each call also runs its adapter's matmuls); "
                        "default: each adapter merged into its own copy of the weights it changes")


def engine_options(args) -> dict:
    """LocalEngine keyword arguments from the decode flags."""
    if args.prompt_cache_tokens < 1:
        raise ValueError("--prompt-cache-tokens must be positive (use --no-prompt-cache to turn it off)")
    if args.prompt_lookup < 0:
        raise ValueError("--prompt-lookup must be 0 (off) or positive")
    if args.mix_adapters and args.decode == "deterministic":
        raise ValueError("--mix-adapters needs --decode batched (deterministic decoding runs one adapter per batch)")
    return {"prompt_cache_tokens": 0 if args.no_prompt_cache else args.prompt_cache_tokens,
            "deterministic": args.decode == "deterministic", "prompt_lookup": args.prompt_lookup,
            "mix_adapters": args.mix_adapters}


def budgets_from(args) -> Budgets:
    budgets = Budgets(**{f.name: getattr(args, f.name) for f in fields(Budgets)})
    for f in fields(Budgets):
        if getattr(budgets, f.name) < (0 if f.name.endswith("retries") else 1):
            raise ValueError(f"--max-{f.name.replace('_', '-')} must be positive")
    if budgets.new_tokens >= budgets.context:
        raise ValueError("--max-new-tokens must be smaller than --max-context")
    return budgets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="ProST rollouts: collect teacher trajectories or roll "
                                     "out a (trained) system on a split of the world.")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("collect", help="record teacher trajectories for training")
    c.add_argument("--teacher", default=None, help="'gold' (replay the mini-world's gold sub-tasks) or a "
                   "model id / folder that plays every role")
    c.add_argument("--teacher-url", default=None, help="OpenAI-compatible endpoint (base URL, e.g. "
                   "http://host:8000/v1) that plays every role")
    c.add_argument("--teacher-model", default=None, help="model name to request from --teacher-url")
    c.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the "
                   "endpoint's API key")
    c.add_argument("--count-with", default=None, help="model id / folder whose tokenizer counts the "
                   "teacher's tokens (FLOPs stay 0 for teachers)")
    c.add_argument("--keep-failed", action="store_true", help="also keep trajectories whose task fails "
                   "AppWorld's evaluation")
    c.add_argument("--recovery-share", type=float, default=0.5, help="gold teacher: share of tasks that "
                   "get a mistake-and-recovery sub-task")
    add_common_flags(c)
    r = commands.add_parser("run", help="roll out a system of models (with optional LoRA adapters)")
    r.add_argument("--model", default=None, help="base model id or folder for every role")
    r.add_argument("--single", action="store_true", help="run the single-agent ReAct baseline instead "
                   "of planner/executor/critic")
    for role in trajectories.ROLES:
        r.add_argument(f"--{role}-model", default=None, help=f"base model for the {role} (overrides --model)")
        r.add_argument(f"--{role}-adapter", default=None, help=f"LoRA adapter folder for the {role}")
    add_common_flags(r)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        budgets = budgets_from(args)
        if args.command == "collect":
            tokenizer = model_io.load_tokenizer(args.count_with) if args.count_with else None
            system = teacher_system(args.teacher, args.teacher_url, args.teacher_model, args.api_key_env,
                                    args.root, args.recovery_share, args.device, args.dtype, tokenizer,
                                    engine_options(args))
            summary = collect(system, args.split, args.out, budgets, root=args.root, workers=args.workers,
                              max_batch=args.max_batch, keep_failed=args.keep_failed, limit=args.limit,
                              scenarios=args.scenarios, tokenizer=tokenizer)
            fate = "kept" if args.keep_failed else "dropped"
            print(f"kept {len(summary.kept)}, failed evaluation {len(summary.failed)} ({fate}), "
                  f"already in {args.out}: {summary.skipped}")
            if summary.failed:
                print("failed:", " ".join(summary.failed))
            print(summary.stats.summary())
        else:
            kind = "single" if args.single else "multi"
            models = {role: getattr(args, f"{role}_model") or args.model for role in trajectories.ROLES}
            adapters = {role: getattr(args, f"{role}_adapter") for role in trajectories.ROLES}
            system = local_system(kind, models, adapters, args.device, args.dtype, **engine_options(args))
            stats = run(system, args.split, args.out, budgets, root=args.root, workers=args.workers,
                        max_batch=args.max_batch, limit=args.limit, scenarios=args.scenarios)
            records = [r for r in trajectories.read_trajectories(args.out) if r["split"] == args.split]
            passed = sum(r["evaluation"]["success"] for r in records if r["evaluation"])
            print(f"{passed}/{len(records)} tasks of {args.split} in {args.out} pass evaluation")
            print(stats.summary())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
