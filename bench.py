"""bench.py: prost side by side with the reference libraries (transformers, PEFT), speed and memory.

Each area of prost adds one `bench_<area>()` function and one entry in SECTIONS; `python bench.py` runs every
section, `python bench.py decode` only the named ones. The references are imported here, never in the product.

Sections:
  decode   decoding.generate vs transformers' generate, greedy, on the same random Qwen2 weights and (with
           --real-model) a real model (batch 1 and 8, fp32 and bf16; prompt-lookup drafts of both at batch 1 on the
           real model): tokens/s and ratios; then the peak memory (RSS) of loading a checkpoint.
  lora     forward time with an active r=16 LoRA adapter on all 7 projections vs the plain base forward (prost,
           and PEFT over transformers for comparison), merged adapter too; adapter sizes for Qwen2.5-1.5B.
  train    LoRA training steps on a real model (--model FOLDER) over the gold trajectories' planner and executor
           examples, bf16 autocast: transformers+PEFT (labels -100 off the targets) vs prost on the same micro-batches
           vs prost with its fast paths (nested examples merged, shared trunks): examples/s, target tokens/s, MFU
           against this machine's measured bf16 matmul peak, peak RSS growth; then prost's fast paths on all the
           machine's threads against the same threads' measured peak.
  world    the mini-world: build time (wall and CPU), then world sessions: worker start, first and later task
           opens (each a fresh sandboxed process), execute latency (plain Python and one API call), evaluate
           latency (snapshot + a fresh evaluator process), and gold-solution throughput with 1 and 2 workers on
           the dev split (tasks/minute, CPU per task of the workers and all their task and evaluator processes).
  rollout  rollout.run_rollouts on the mini-world dev split (tiny preset and, with --real-model, a real model):
           prompt cache off/on, 1 vs 4 worlds, prompt-lookup, deterministic decoding: tasks/minute, prefill
           tokens computed per task, new tokens/s, model batch sizes, share of wall time outside the model.
  evaluate a trained system (--agents, e.g. `make demo`'s ckpts/demo) evaluated on the demo's dev and test tasks
           under the demo's budgets: one call at a time (unpadded, the speed of decoding every call alone) vs
           deterministic decoding alone (--workers 1 --max-batch 1) vs deterministic decoding batched across tasks:
           tasks/minute, TGC/SGC, and whether the two deterministic runs recorded the same trajectories; first,
           the decode-step time of one unpadded row against the batch-invariant fixed-shape pieces.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

import decoding
import meter
import model as M
import model_io

HERE = Path(__file__).resolve().parent


# ---- decode -----------------------------------------------------------------------------------------------------

DECODE_MODEL = dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                    tie_word_embeddings=True)  # ~32M parameters: small enough for 2 CPU cores, big enough to matter
TINY_MODEL = dict(asdict(model_io.PRESETS["tiny"]), max_position_embeddings=4096,
                  tie_word_embeddings=True)  # the `tiny` preset the demo trains and runs
PROMPT_LEN, NEW_TOKENS, DECODE_ROUNDS = 128, 64, 3
LOOKUP = 4  # draft tokens of prompt-lookup decoding, prost's and transformers' (prompt_lookup_num_tokens)
# A real model (an HF folder, e.g. SmolLM2-135M-Instruct) for the decode and rollout sections; --real-model.
REAL_MODEL = HERE / "models" / "smollm2-135m-instruct"  # where `make fetch` puts it


def _random_qwen2_checkpoint(out_dir: Path, dims: dict = DECODE_MODEL):
    import transformers
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**dims, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    hf = transformers.Qwen2ForCausalLM(config).eval()
    hf.save_pretrained(out_dir)
    return hf


def _chat_prompt(folder: Path) -> list[int]:
    """A real model's prompt: an executor-style chat (this project's API rules, then a task), cut to PROMPT_LEN
    tokens at a word boundary of the system text so that it still ends with the generation prompt."""
    import agents
    tok = M.Tokenizer.from_pretrained(folder)
    words = agents.API_RULES.split(" ")
    task = {"role": "user", "content": "Task: send $20 to my roommate on venmo for yesterday's dinner."}
    while True:
        ids = tok.chat([{"role": "system", "content": " ".join(words)}, task], add_generation_prompt=True)[0]
        if len(ids) <= PROMPT_LEN:
            return ids
        words.pop()


def _decode_speeds(folder: Path, hf, batch: int, dtype: torch.dtype, rounds: int, prompt: list[int] | None,
                   lookup: bool) -> dict:
    """Best tokens/s over `rounds` interleaved runs (after a short warm-up each) of prost and transformers, and
    with `lookup` of both with prompt-lookup drafts; 'same' says whether all of them produced the same tokens."""
    import transformers
    ours = decoding.lay_out_for_decoding(M.Transformer.from_pretrained(folder, dtype=dtype))  # as rollouts run it
    hf = hf.to(dtype)
    hf.generation_config.eos_token_id = None  # exactly NEW_TOKENS tokens from both, whatever they are
    if prompt is None:
        prompts = torch.randint(0, hf.config.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    else:
        prompts = torch.tensor([prompt] * batch)
    outputs = {}

    def run_ours(n, k=0):
        out = decoding.generate(ours, prompts.tolist(), n, stop_ids=(), prompt_lookup=k)
        assert all(g.n_new == n for g in out)
        outputs[("prost", k)] = [g.ids for g in out]

    def run_hf(n, k=0):
        extra = {"prompt_lookup_num_tokens": k} if k else {}
        cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
                                            **extra)
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
        assert out.shape[1] == prompts.shape[1] + n
        outputs[("hf", k)] = out[:, prompts.shape[1]:].tolist()

    runs = {"prost": run_ours, "transformers": run_hf}
    if lookup:
        runs.update({"prost lookup": lambda n: run_ours(n, LOOKUP), "transformers lookup": lambda n: run_hf(n, LOOKUP)})
    best = dict.fromkeys(runs, 0.0)
    for round_ in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run(4 if round_ == 0 else NEW_TOKENS)  # round 0 warms up
            if round_:
                best[name] = max(best[name], batch * NEW_TOKENS / (time.perf_counter() - start))
    hf.float()
    best["same"] = all(o == outputs[("hf", 0)] for o in outputs.values())
    return best


_PEAK_RSS = """
import sys, torch
sys.path.insert(0, {here!r})
import model, transformers
from meter import status_kib as kib
with torch.device('meta'):  # torch imports its meta kernels (~70 MB, once) on first use: not part of the load
    torch.nn.Embedding(3, 2)
base = kib('VmRSS:')
if {which!r} == 'prost':
    m = model.Transformer.from_pretrained({folder!r}, dtype=torch.{dtype})
else:
    m = transformers.AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.{dtype})
params = sum(p.numel() * p.element_size() for p in m.parameters())
print(params, (kib('VmHWM:') - base) * 1024)
"""


def _loading_peak(folder: Path, which: str, dtype: str) -> tuple[int, int]:
    """(parameter bytes, peak RSS growth in bytes) of loading `folder` in a fresh process."""
    code = _PEAK_RSS.format(here=str(HERE), which=which, folder=str(folder), dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=600).stdout
    params, peak = map(int, out.split()[-2:])
    return params, peak


def bench_decode() -> None:
    import os
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread keeps timings stable under others' load
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"decode: greedy, prompt {PROMPT_LEN} tokens (random ids for random models; a chat prompt for the real "
                  f"model), {NEW_TOKENS} new tokens, best of {DECODE_ROUNDS} interleaved runs, "
                  f"{torch.get_num_threads()} thread unless the row says more, load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
                  f"'+lookup' = prompt-lookup drafts of {LOOKUP} tokens (prost's prompt_lookup, transformers' "
                  f"prompt_lookup_num_tokens), batch 1 only")
            print(f"  {'model':<22} {'dtype':<9} {'batch':>5} {'threads':>7} {'prost':>7} {'+lookup':>8} "
                  f"{'transformers':>12} {'+lookup':>8} {'ratio':>6} {'+lookup/plain':>13} {'same tokens':>11}")
            models = [("tiny preset", TINY_MODEL), ("32M", DECODE_MODEL)]
            if (REAL_MODEL / "config.json").is_file():
                models.append(("real", REAL_MODEL))
            else:
                print(f"  (no real model at {REAL_MODEL}: pass --real-model FOLDER for the SmolLM2 rows)")
            for label, dims in models:
                if label == "real":
                    import transformers
                    folder, prompt = REAL_MODEL, _chat_prompt(REAL_MODEL)
                    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                    label = REAL_MODEL.name
                else:
                    folder, prompt = Path(tmp) / label.replace(" ", "-"), None
                    hf = _random_qwen2_checkpoint(folder, dims)
                name = f"{label} {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M"
                # the real model's batch-1 fp32 decode also on every core: a rollout decodes so
                cells = [(dtype, batch, 1) for dtype in (torch.float32, torch.bfloat16) for batch in (1, 8)]
                if prompt is not None and os.cpu_count() > 1:
                    cells.insert(1, (torch.float32, 1, os.cpu_count()))
                for dtype, batch, n_threads in cells:
                    lookup = batch == 1 and prompt is not None
                    torch.set_num_threads(n_threads)
                    r = _decode_speeds(folder, hf, batch, dtype, DECODE_ROUNDS, prompt, lookup)
                    torch.set_num_threads(1)
                    cell = lambda key: f"{r[key]:.1f}" if key in r else "-"  # noqa: E731
                    gain = f"{r['prost lookup'] / r['transformers']:.2f}" if lookup else "-"
                    print(f"  {name:<22} {str(dtype).removeprefix('torch.'):<9} {batch:>5} {n_threads:>7} "
                          f"{r['prost']:>7.1f} {cell('prost lookup'):>8} {r['transformers']:>12.1f} "
                          f"{cell('transformers lookup'):>8} {r['prost'] / r['transformers']:>6.2f} {gain:>13} "
                          f"{str(r['same']):>11}")
            print("  ratio = prost / transformers (plain); +lookup/plain = prost with drafts / plain transformers. "
                  "Greedy tokens are those of plain decoding up to fp rounding ('same tokens': all runs agree).")
            # loading memory: a bf16 checkpoint, loaded as bf16 (same dtype) and as fp32 (converted while loading)
            folder = Path(tmp) / "32M"
            bf16 = Path(tmp) / "bf16"
            model_io.save_pretrained(M.Transformer.from_pretrained(folder, dtype=torch.bfloat16), bf16)
            size = sum(f.stat().st_size for f in bf16.glob("*.safetensors"))
            print(f"  loading: peak RSS growth of a fresh process loading the 32M model's bf16 checkpoint "
                  f"({size / 2**20:.1f} MiB)")
            for dtype in ("bfloat16", "float32"):
                for which in ("prost", "transformers"):
                    params, peak = _loading_peak(bf16, which, dtype)
                    print(f"    {which:<12} as {dtype:<8}: peak {peak / 2**20:6.1f} MiB for {params / 2**20:6.1f} MiB "
                          f"of parameters ({peak / params:.2f}x)")
    finally:
        torch.set_num_threads(threads)


# ---- lora -------------------------------------------------------------------------------------------------------

LORA_BATCH, LORA_SEQ, LORA_ROUNDS = 4, 128, 9
# Qwen2.5-1.5B's architecture (its config.json), for computed adapter sizes.
QWEN25_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)


def _best_of_rounds(runs: dict, rounds: int) -> dict:
    """Fastest of `rounds` timings per run (each run returns its seconds); one call of every run per round, so
    that load from other processes on a shared machine hits all of them alike. Round 0 warms up."""
    best = {name: float("inf") for name in runs}
    for round_ in range(rounds + 1):
        for name, run in runs.items():
            seconds = run()
            if round_:
                best[name] = min(best[name], seconds)
    return best


def bench_lora() -> None:
    threads = torch.get_num_threads()
    # One thread, timed in CPU seconds of this process: on a shared machine, wall time mostly measures the
    # other processes; single-threaded CPU time does not count waiting (and no worker threads spin).
    torch.set_num_threads(1)
    try:
        _bench_lora()
    finally:
        torch.set_num_threads(threads)


def _bench_lora() -> None:
    import lora
    import peft
    ids = torch.randint(0, DECODE_MODEL["vocab_size"], (LORA_BATCH, LORA_SEQ), generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2-random"
        hf = _random_qwen2_checkpoint(folder)
        ours = M.Transformer.from_pretrained(folder, dtype=torch.float32)
    targets = list(lora.DEFAULT_TARGETS)
    lora.apply_lora(ours, r=16, alpha=32, targets=targets)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets)).eval()

    @torch.inference_mode()
    def prost(adapter: str | None, merged: bool = False):
        lora.set_adapter(ours, adapter)
        if merged:
            lora.merge(ours)  # merging costs one B @ A per layer, outside the forward it speeds up
        start = time.process_time()
        ours(ids)
        elapsed = time.process_time() - start
        lora.unmerge(ours)
        return elapsed

    @torch.inference_mode()
    def with_peft(enabled: bool):
        start = time.process_time()
        if enabled:
            peft_model(input_ids=ids)
        else:
            with peft_model.disable_adapter():
                peft_model(input_ids=ids)
        return time.process_time() - start

    best = _best_of_rounds({
        "prost base": lambda: prost(None), "prost adapter": lambda: prost("default"),
        "prost merged": lambda: prost("default", merged=True),
        "transformers base": lambda: with_peft(False), "PEFT adapter": lambda: with_peft(True)}, LORA_ROUNDS)

    n_adapter = sum(p.numel() for p in lora.adapter_parameters(ours, "default"))
    n_base = sum(p.numel() for n, p in ours.named_parameters() if ".lora_" not in n)
    print(f"lora: inference forward of batch {LORA_BATCH} x {LORA_SEQ} tokens, fp32, the decode section's random "
          f"Qwen2 ({n_base / 1e6:.1f}M), CPU time, best of {LORA_ROUNDS} interleaved rounds, 1 thread")
    print(f"  adapter r=16 on all 7 projections: {n_adapter / 1e6:.2f}M parameters ({100 * n_adapter / n_base:.2f}%)")
    print(f"  {'':<24} {'base ms':>8} {'adapter ms':>11} {'ratio':>6}")
    for label, base, adapted in (("prost", "prost base", "prost adapter"), ("prost, merged", "prost base", "prost merged"),
                                 ("PEFT over transformers", "transformers base", "PEFT adapter")):
        print(f"  {label:<24} {1e3 * best[base]:>8.1f} {1e3 * best[adapted]:>11.1f} {best[adapted] / best[base]:>6.2f}")
    config = M.ModelConfig.from_hf(QWEN25_1_5B)
    for r in (8, 16):
        n = lora.count_adapter_parameters(config, r)
        print(f"  Qwen2.5-1.5B adapter (computed), r={r:<2} on all 7 projections: {n:,} parameters "
              f"({n * 4 / 2**20:.1f} MiB fp32, {100 * n / 1.54e9:.2f}% of 1.54B)")


# ---- train ------------------------------------------------------------------------------------------------------

# Small enough for a shared 2-core machine: the reference's activations for 4 x 1.2k tokens alone are ~9 GB.
TRAIN_TASKS, TRAIN_MICRO, TRAIN_ROUNDS, TRAIN_ROLES = 1, 2, 2, ("planner", "executor")
TRAIN_DATA = HERE / "trajectories" / "train.jsonl"
PEAK_SIZE, PEAK_ROUNDS = 1024, 3


def matmul_peak(dtype: torch.dtype, clock=time.process_time, size: int = PEAK_SIZE) -> float:
    """This machine's matmul FLOP/s at the current thread count, per second of `clock` (CPU seconds: per
    thread): best of a few square products, big enough to reach the library's top speed. The denominator of
    the training MFU below."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: the first call picks and prepares the kernel
    best = float("inf")
    for _ in range(PEAK_ROUNDS):
        start = clock()
        for _ in range(4):
            a @ b
        best = min(best, (clock() - start) / 4)
    return 2 * size ** 3 / best


def _train_examples(model_dir: str, data_path: str, role: str):
    """The role's examples (every sub-task) of the first TRAIN_TASKS multi-agent gold trajectories, rendered by
    the model's tokenizer."""
    import data
    import trajectories
    records = [r for r in trajectories.read_trajectories(data_path) if r["system"]["kind"] == "multi"][:TRAIN_TASKS]
    return data.build_examples(records, role, M.Tokenizer.from_pretrained(model_dir), 4096)[0]


def _micro_batches(examples, model_dir: str, shared: bool):
    """Micro-batches as prost's loop plans them (epoch 1, seed 0) of the examples with its fast paths off, or
    of their merged sequences with them on; the reference trains the separate examples in exactly the
    batches of the plain case. (With one task, both plans hold the same examples in the same batches.)"""
    import batching
    import prost
    import train_config
    cfg = train_config.TrainConfig(model=model_dir, micro_batch_size=TRAIN_MICRO, seed=0, merge_nested=shared,
                                   trunks=shared)
    sequences = batching.merge_nested_examples(examples) if shared else examples
    plan = prost.epoch_micro_batches(sequences, 1, cfg, M.ModelConfig.from_hf(model_dir))
    return [[sequences[i] for i in batch] for batch in plan]


def _train_step(which: str, model_dir: str, data_path: str, role: str):
    """A function running one LoRA optimizer step (r=16 on prost's default targets, dropout 0.05, AdamW,
    clipping, bf16 autocast) over all the role's examples, returning its CPU seconds; and the micro-batches."""
    import batching
    import data
    import lora
    import prost
    import train_config
    torch.manual_seed(0)
    examples = _train_examples(model_dir, data_path, role)
    batches = _micro_batches(examples, model_dir, shared=which == "prost")
    pad_id = M.Tokenizer.from_pretrained(model_dir).pad_id
    tensors = [(batching.collate_with_trunk if which == "prost" else data.collate)(b, pad_id) for b in batches]
    lengths = [torch.tensor([e.n_tokens for e in b]) for b in batches]
    step_targets = sum(e.n_targets for e in examples)
    if which.startswith("prost"):
        cfg = train_config.TrainConfig(model=model_dir, lora_r=16, lora_alpha=32, lora_dropout=0.05)
        model = prost.build_model(cfg, torch.device("cpu"), "bf16")
        params = list(prost.trainable_parameters(model).values())

        def accumulate():
            prost.accumulate_gradients(model, tensors, step_targets, torch.device("cpu"), "bf16")
    else:
        import warnings

        import peft
        import transformers
        transformers.logging.set_verbosity_error()  # keep the table readable: no loading bars or deprecation notes
        transformers.logging.disable_progress_bar()
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                            target_modules=list(lora.DEFAULT_TARGETS)))
        params = [p for p in model.parameters() if p.requires_grad]  # PEFT keeps adapters fp32 over a bf16 base

        def accumulate():
            for (ids, mask, _), n in zip(tensors, lengths):  # TRL's assistant-only loss: labels -100 off the targets
                labels = ids.masked_fill(~mask, -100)
                attention_mask = (torch.arange(ids.shape[1])[None] < n[:, None]).long()  # (B, T), 0 on padding
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
                (loss * int(mask[:, 1:].sum()) / step_targets).backward()  # the step's mean token loss
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step() -> float:
        start = time.process_time()  # CPU seconds of this process: waiting for other processes does not count
        accumulate()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.process_time() - start
    return step, batches


def _train_peak_worker(which: str, model_dir: str, data_path: str, role: str) -> None:
    """In a fresh process: print the peak RSS growth (bytes) over a training step, optimizer state included."""
    torch.set_num_threads(1)
    step, _ = _train_step(which, model_dir, data_path, role)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS: count training only
    base = meter.status_kib("VmRSS:")
    step()
    print((meter.status_kib("VmHWM:") - base) * 1024)


def _train_peak(which: str, model_dir: str, data_path: str, role: str) -> int:
    code = f"import bench; bench._train_peak_worker({which!r}, {model_dir!r}, {data_path!r}, {role!r})"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True,
                         timeout=3600).stdout
    return int(out.split()[-1])


LONG_ROWS, LONG_SEQ, LONG_TARGETS = 4, 2048, 256  # a micro-batch of long executor-like examples


def _long_batch_peak_worker(which: str, model_dir: str, checkpointing: bool, rows: int = LONG_ROWS) -> None:
    """In a fresh process: one forward and backward of a rows x LONG_SEQ micro-batch whose last LONG_TARGETS
    tokens per row are targets (bf16 autocast, r=16); print the RSS before the step and the process's peak RSS
    (bytes), and the step's CPU seconds."""
    import data
    import lora
    import prost
    import train_config
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(4)
    vocab = M.ModelConfig.from_hf(model_dir).vocab_size
    ids = torch.randint(0, vocab, (rows, LONG_SEQ), generator=g)  # (B, T)
    mask = torch.zeros(rows, LONG_SEQ, dtype=torch.bool)  # (B, T)
    mask[:, -LONG_TARGETS:] = True
    if which == "prost":
        cfg = train_config.TrainConfig(model=model_dir, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                                checkpoint_activations=checkpointing)
        model = prost.build_model(cfg, torch.device("cpu"), "bf16").train()
        before, start = meter.status_kib("VmRSS:") * 1024, time.process_time()
        prost.accumulate_gradients(model, [data.Batch(ids, mask, 0)], int(mask[:, 1:].sum()), torch.device("cpu"),
                                   "bf16")
    else:
        import peft
        import transformers
        transformers.logging.set_verbosity_error()
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        if checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                        target_modules=list(lora.DEFAULT_TARGETS))).train()
        before, start = meter.status_kib("VmRSS:") * 1024, time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.masked_fill(~mask, -100)).loss
        loss.backward()
    print(before, meter.status_kib("VmHWM:") * 1024, time.process_time() - start)


def _long_batch_peak(which: str, model_dir: str, checkpointing: bool, rows: int) -> tuple[int, int, float]:
    code = f"import bench; bench._long_batch_peak_worker({which!r}, {model_dir!r}, {checkpointing}, {rows})"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True,
                         timeout=3600).stdout.split()
    return int(out[-3]), int(out[-2]), float(out[-1])


def bench_train(model_dir: str | None, data_path: str) -> None:
    if model_dir is None:
        print("train: skipped; it needs a real model folder: `make fetch`, or python bench.py train --real-model "
              "FOLDER (e.g. SmolLM2-135M-Instruct as a Hugging Face folder)")
        return
    if not Path(data_path).is_file():
        raise FileNotFoundError(f"{data_path} does not exist; collect it with: python rollout.py collect --teacher "
                                f"gold --split train --limit 12 --out {data_path}")
    import os

    import batching
    import data
    import lora
    import prost
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread keeps timings stable under others' load
    try:
        peak = {dtype: matmul_peak(dtype) for dtype in (torch.bfloat16, torch.float32)}
        config = M.ModelConfig.from_hf(model_dir)
        adapter_weights = lora.count_adapter_parameters(config, 16)
        print(f"train: one LoRA optimizer step (r=16 on {', '.join(lora.DEFAULT_TARGETS)}, dropout "
              f"0.05, AdamW, clipping, bf16 autocast) over every planner / executor example of the first "
              f"{TRAIN_TASKS} gold trajectories in {data_path}, micro-batches of {TRAIN_MICRO} planned as prost "
              f"does; model {model_dir}; {meter.cpu_name()}. Speed: CPU time, 1 thread, best of {TRAIN_ROUNDS} "
              f"interleaved rounds after a warm-up; peak: RSS growth over a step in a fresh process. Load average at "
              f"start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
        print(f"  measured matmul peak ({PEAK_SIZE}^3, 1 thread): bf16 {peak[torch.bfloat16] / 1e9:.0f} GFLOP/s, "
              f"fp32 {peak[torch.float32] / 1e9:.0f} GFLOP/s. MFU: model FLOPs of the sequences a row trains "
              f"(prost's count; the reference runs the same as prost's separate examples) per CPU-second over the "
              f"bf16 peak.")
        print(f"  {'role':<9} {'system':<26} {'sequences':>9} {'tokens':>7} {'targets':>7} {'examples/s':>10} "
              f"{'target tok/s':>12} {'ratio':>6} {'MFU':>6} {'peak MiB':>9}")
        systems = {"transformers+PEFT": "peft", "prost, separate examples": "prost-separate",
                   "prost, fast paths": "prost"}
        for role in TRAIN_ROLES:
            steps, batches = {}, {}
            for label, which in systems.items():
                steps[label], batches[label] = _train_step(which, model_dir, data_path, role)
            best = _best_of_rounds(steps, TRAIN_ROUNDS)
            examples = _train_examples(model_dir, data_path, role)
            targets = sum(e.n_targets for e in examples)
            for label, which in systems.items():
                sequences = [e for b in batches[label] for e in b]
                seconds = best[label]
                ratio = best["transformers+PEFT"] / seconds
                flops = sum(prost.batch_train_flops(config, adapter_weights, b,
                                                    batching.trunk_length(b) if which == "prost" else 0)
                            for b in batches[label])  # what this row runs
                mfu = flops / seconds / peak[torch.bfloat16]
                memory = _train_peak(which, model_dir, data_path, role) / 2**20
                print(f"  {role:<9} {label:<26} {len(sequences):>9} {sum(e.n_tokens for e in sequences):>7} "
                      f"{targets:>7} {len(examples) / seconds:>10.2f} {targets / seconds:>12.1f} {ratio:>6.2f} "
                      f"{100 * mfu:>5.1f}% {memory:>9.0f}")
        print(f"  one micro-batch of {LONG_ROWS} x {LONG_SEQ} tokens ({LONG_TARGETS} targets per row), forward and "
              f"backward, fresh process: peak RSS (model, data and all) and CPU seconds. Without checkpointing the "
              f"step runs on 1 row and the peak is extrapolated (model + {LONG_ROWS} x the step's growth): "
              f"{LONG_ROWS} rows need more memory than a shared machine can lend")
        for which, checkpointing in (("peft", True), ("peft", False), ("prost", True), ("prost", False)):
            label = "transformers+PEFT" if which == "peft" else "prost"
            rows = LONG_ROWS if checkpointing else 1
            before, rss, seconds = _long_batch_peak(which, model_dir, checkpointing, rows)
            peak = before + (rss - before) * LONG_ROWS // rows
            how = "with" if checkpointing else "without"
            print(f"    {label:<18} {how:<7} activation checkpointing: {peak / 2**30:5.2f} GiB"
                  + (f" (1 row measured: {rss / 2**30:.2f} GiB)" if rows == 1 else "")
                  + f", {seconds * LONG_ROWS / rows:6.1f} s")
        print(f"  load average at the end {os.getloadavg()[0]:.1f}")
        print(_all_threads_mfu(model_dir, data_path, threads))
    finally:
        torch.set_num_threads(threads)


def _all_threads_mfu(model_dir: str, data_path: str, threads: int) -> str:
    """prost's fast-path step on all `threads` threads, in wall seconds, against the same threads' bf16 peak
    (as a training run uses the machine); only meaningful while nothing else runs."""
    import os

    import batching
    import lora
    import prost
    torch.set_num_threads(threads)
    peak = matmul_peak(torch.bfloat16, time.perf_counter, 2 * PEAK_SIZE)
    config = M.ModelConfig.from_hf(model_dir)
    adapter_weights = lora.count_adapter_parameters(config, 16)
    lines = [f"  {threads} threads, wall clock (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): "
             f"bf16 matmul peak {peak / 1e9:.0f} GFLOP/s ({2 * PEAK_SIZE}^3)"]
    for role in TRAIN_ROLES:
        step, batches = _train_step("prost", model_dir, data_path, role)
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(TRAIN_ROUNDS):
            step()
        seconds = (time.perf_counter() - start) / TRAIN_ROUNDS
        flops = sum(prost.batch_train_flops(config, adapter_weights, b, batching.trunk_length(b)) for b in batches)
        tokens = sum(e.n_tokens for b in batches for e in b)
        lines.append(f"    {role:<9} prost, fast paths: {tokens / seconds:7.0f} tokens/s, {flops / seconds / 1e9:5.0f} "
                     f"GFLOP/s, MFU {100 * flops / seconds / peak:4.1f}% of the {threads}-thread bf16 peak")
    return "\n".join(lines)


# ---- world -----------------------------------------------------------------------------------------------------

def bench_world() -> None:
    import os
    import resource
    import statistics

    import miniworld
    import world

    def median_ms(samples):
        return 1000 * statistics.median(samples)

    print(f"world: load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall times include "
          "other processes' load; worker CPU times do not)")
    with tempfile.TemporaryDirectory() as tmp:
        start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        summary = miniworld.build_world(tmp, seed=0)  # runs in a child process, reaped before it returns
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        build_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        print(f"build: {time.perf_counter() - start:.1f} s wall, {build_cpu:.1f} s CPU "
              f"for {sum(summary['tasks'].values())} tasks "
              f"{summary['tasks']}, {summary['scenarios']} scenarios, apps {', '.join(summary['apps'])}")
        print(f"  sub-tasks per task {summary['subtasks']}, difficulty {summary['difficulty']}, "
              f"{summary['question_tasks']} questions, {summary['multi_app_tasks']} multi-app")
        dev = world.load_split("dev", tmp)
        with world.WorldSession(tmp) as session:
            start = time.perf_counter()
            session.start()
            started = time.perf_counter() - start
            start = time.perf_counter()
            session.open(dev[0])
            first_open = time.perf_counter() - start
            opens, plain, api, evals = [], [], [], []
            for task_id in dev[1:13]:
                start = time.perf_counter()
                session.open(task_id)
                opens.append(time.perf_counter() - start)
                for samples, code in ((plain, "x = sum(range(100))"), (api, "apis.supervisor.show_profile()")):
                    for _ in range(3):
                        start = time.perf_counter()
                        session.execute(code)
                        samples.append(time.perf_counter() - start)
                start = time.perf_counter()
                session.evaluate()
                evals.append(time.perf_counter() - start)
        print(f"world worker start (spawn + import appworld + warm-up): {started:.2f} s; first task open {first_open:.2f} s")
        print(f"median wall latencies: open {median_ms(opens):.0f} ms, execute (plain Python) {median_ms(plain):.1f} ms, "
              f"execute (one API call) {median_ms(api):.1f} ms, evaluate {median_ms(evals):.0f} ms")

        def gold(session, task_id):
            codes = [step["code"] for step in miniworld.gold_subtasks(task_id, session.root)]
            return world.run_codes(session, task_id, codes)[1].success

        for n in (1, 2):
            with world.WorldPool(n, root=tmp) as pool:
                pool.map(lambda s, t: s.open(t), dev[:n])  # warm: each worker's first open is the slow one
                cpu_before = sum(s.cpu_seconds() for s in pool.sessions)
                start = time.perf_counter()
                passed = pool.map(gold, dev)
                seconds = time.perf_counter() - start
                cpu = sum(s.cpu_seconds() for s in pool.sessions) - cpu_before
            print(f"gold solutions, {n} worker(s): {len(dev)} dev tasks in {seconds:.1f} s wall "
                  f"({60 * len(dev) / seconds:.0f} tasks/min), worker CPU {1000 * cpu / len(dev):.0f} ms/task "
                  f"(open + every sub-task + evaluate), {sum(passed)}/{len(dev)} pass")


# ---- rollout ----------------------------------------------------------------------------------------------------

ROLLOUT_NEW_TOKENS = 32  # random models rarely stop on their own: this caps every call
ROLLOUT_SINGLE_TURNS, ROLLOUT_CRITIC_RETRIES = 10, 1  # smaller than the defaults, to keep the section short
ROLLOUT_WORKERS = 4
ROLLOUT_MODEL_TASKS = 4  # the first dev tasks, for the systems with a model (the gold teacher runs all of dev)
REAL_TASKS = 2  # the real model is ~100x the tiny preset's cost per token: fewer tasks, shorter conversations
REAL_BUDGETS = dict(new_tokens=24, single_turns=3, subtasks=2, executor_turns=2, critic_retries=0, context=2048)
# (label, workers, LocalEngine options): the prompt cache off/on, 1 vs 4 worlds, and evaluation's default
ENGINE_SETTINGS = [
    ("cache off", 1, dict(prompt_cache_tokens=0, prompt_lookup=0)),
    ("cache on", 1, dict(prompt_lookup=0)),
    ("cache off", ROLLOUT_WORKERS, dict(prompt_cache_tokens=0, prompt_lookup=0)),
    ("cache on", ROLLOUT_WORKERS, dict(prompt_lookup=0)),
    ("cache on, lookup", ROLLOUT_WORKERS, dict()),
    ("deterministic", ROLLOUT_WORKERS, dict(deterministic=True)),
]
# cross-adapter batching off/on: executor and critic each with an adapter, merged (each role's calls batched
# apart) or mixed (one batch for both roles); batched decoding, the cache on
ADAPTER_SETTINGS = [
    ("adapters merged", ROLLOUT_WORKERS, dict(prompt_lookup=0)),
    ("adapters mixed", ROLLOUT_WORKERS, dict(prompt_lookup=0, mix_adapters=True)),
]
ADAPTER_ROLES = ("executor", "critic")


def _random_adapters(folder: Path, out: Path) -> dict[str, str]:
    """role -> folder of a random r=16 adapter on prost's default targets (B non-zero, so it changes the
    outputs): the shapes and cost of a trained one, for the roles in ADAPTER_ROLES."""
    import lora
    base = M.Transformer.from_pretrained(folder)
    adapters = {}
    for i, role in enumerate(ADAPTER_ROLES):
        lora.add_adapter(base, role, r=16, alpha=32)
        torch.manual_seed(i)
        with torch.no_grad():
            for layer in lora.lora_layers(base).values():
                layer.lora_B[role].normal_(0.0, 0.01)
        adapters[role] = str(lora.save_adapter(base, out / role, role))
    return adapters


def _rollout_systems(root: Path, folder: Path, options: dict, kinds: tuple, adapters: dict | None = None) -> list:
    """(label, system) pairs on a fresh engine of `folder` (so every setting starts with an empty prompt cache),
    warmed up (its first generate call is slow): the model in every role, the gold planner with the model as
    executor and critic (plans parse, so all three roles run with real prompt lengths), the single agent.
    `adapters` (role -> folder) are loaded for their roles."""
    import agents
    import rollout
    import teacher
    engine = rollout.LocalEngine(str(folder), **options)
    warm_up = agents.ModelRequest("warm_up", "planner", [{"role": "user", "content": "Hello"}])
    engine.complete([warm_up], [None], agents.Budgets(new_tokens=4))
    for role, adapter in (adapters or {}).items():
        engine.load_adapter(adapter, role)  # clears the prompt cache
    if engine.prompt_cache is not None:
        engine.prompt_cache.clear()
    multi = agents.System("multi", {role: agents.Binding(engine, role, adapters[role]) if role in (adapters or {})
                                    else agents.Binding(engine) for role in ("planner", "executor", "critic")})
    gold = teacher.GoldEngine(root, recovery_share=0.0)
    systems = {"all roles": multi,
               "gold planner": agents.System("multi", {**multi.roles, "planner": agents.Binding(gold)}),
               "single agent": agents.single_engine_system(engine, kind="single")}
    return [(kind, systems[kind]) for kind in kinds]


def _rollout_row(label: str, tasks: list, system, budgets, root, pool, workers: int) -> str:
    import rollout
    calls = []
    stats = rollout.run_rollouts(tasks, system, budgets, split="dev", root=root, pool=pool, workers=workers,
                                 on_trajectory=lambda r: calls.extend(r["calls"]))
    n = stats.tasks
    prompt = sum(c["prompt_tokens"] for c in calls) / n
    computed = sum(c["prompt_tokens"] - c.get("cached_tokens", 0) for c in calls) / n
    new = sum(c["new_tokens"] for c in calls)
    mean = sum(stats.batch_sizes) / max(len(stats.batch_sizes), 1)
    return (f"  {label:<44} {n:>5} {workers:>7} {n / stats.seconds * 60:>9.2f} {len(calls) / n:>10.1f} "
            f"{prompt:>9.0f} {computed:>9.0f} {computed / max(prompt, 1):>6.0%} "
            f"{new / max(stats.model_seconds, 1e-9):>9.1f} {mean:>6.2f} {1 - stats.model_seconds / stats.seconds:>8.0%}")


def bench_rollout() -> None:
    import os

    import agents
    import miniworld
    import rollout
    import teacher
    import world
    with tempfile.TemporaryDirectory() as tmp:
        root = world.world_root()
        if not (root / "data" / "datasets" / "dev.txt").is_file():
            root = Path(tmp) / "miniworld"
            miniworld.build_world(root)
        dev = world.load_split("dev", root=root)
        budgets = agents.Budgets(new_tokens=ROLLOUT_NEW_TOKENS, single_turns=ROLLOUT_SINGLE_TURNS,
                                 critic_retries=ROLLOUT_CRITIC_RETRIES)
        started = time.perf_counter()
        pool = world.WorldPool(ROLLOUT_WORKERS, root=root)
        print(f"rollout: mini-world dev split ({len(dev)} tasks, {root}); {ROLLOUT_WORKERS} world worker processes "
              f"(started in {time.perf_counter() - started:.1f} s, not counted below); fp32, "
              f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
              f"cores. tiny: the `tiny` preset with random weights (tokenizer trained on the gold dev trajectories), "
              f"budgets: defaults but {ROLLOUT_NEW_TOKENS} new tokens per call, {ROLLOUT_SINGLE_TURNS} single-agent "
              f"turns, {ROLLOUT_CRITIC_RETRIES} critic retry, first {ROLLOUT_MODEL_TASKS} dev tasks; real: "
              f"{REAL_MODEL.name} untrained, first {REAL_TASKS} dev tasks, budgets {REAL_BUDGETS}")
        with pool:
            texts = []  # the warm-up run (every session opens its first world) also gives the tokenizer's texts
            rollout.run_rollouts(dev, agents.single_engine_system(teacher.GoldEngine(root, 0.0)), budgets,
                                 split="dev", root=root, pool=pool, workers=ROLLOUT_WORKERS,
                                 on_trajectory=lambda r: texts.extend(m["content"] for c in r["calls"]
                                                                      for m in c["messages"]))
            tiny = model_io.init_tiny(Path(tmp) / "tiny", texts, preset="tiny")
            print(f"  {'system, setting':<44} {'tasks':>5} {'workers':>7} {'tasks/min':>9} {'calls/task':>10} "
                  f"{'prompt/t':>9} {'computed':>9} {'share':>6} {'new tok/s':>9} {'batch':>6} {'outside':>8}")
            runs = [("tiny", tiny, dev[:ROLLOUT_MODEL_TASKS], budgets, ("gold planner", "single agent"),
                     ENGINE_SETTINGS, None),
                    ("tiny", tiny, dev[:ROLLOUT_MODEL_TASKS], budgets, ("gold planner",), ADAPTER_SETTINGS,
                     _random_adapters(tiny, Path(tmp) / "tiny_adapters"))]
            if (REAL_MODEL / "config.json").is_file():  # the settings that answer the questions, to keep it short
                real_budgets = agents.Budgets(**REAL_BUDGETS)
                runs += [(REAL_MODEL.name, REAL_MODEL, dev[:REAL_TASKS], real_budgets, ("single agent",),
                          [ENGINE_SETTINGS[i] for i in (2, 4, 5)], None),
                         (REAL_MODEL.name, REAL_MODEL, dev[:REAL_TASKS], real_budgets, ("gold planner",),
                          ADAPTER_SETTINGS, _random_adapters(REAL_MODEL, Path(tmp) / "real_adapters"))]
            for name, folder, tasks, run_budgets, kinds, settings, adapters in runs:
                for setting, workers, options in settings:
                    for kind, system in _rollout_systems(root, folder, options, kinds, adapters):
                        print(_rollout_row(f"{name}, {kind}, {setting}", tasks, system, run_budgets, root, pool,
                                           workers), flush=True)
        print("  prompt/t = prompt tokens per task (what every call would prefill without the cache); computed = "
              "prompt tokens per task actually prefilled (share = computed / prompt); new tok/s = new tokens per "
              "second inside engine.complete (prefill included); batch = mean requests per engine.complete; outside "
              "= share of wall time not in engine.complete (world calls, prompt rendering, bookkeeping). lookup = "
              "prompt-lookup drafts for rows decoding alone; deterministic = evaluate.py's default (each call alone, "
              "chunked prefill, lookup on). adapters merged / mixed: executor and critic with random r=16 adapters "
              "(a trained adapter's shapes and cost), merged into per-role weight copies (each role's calls batched "
              "apart) or mixed (--mix-adapters: both roles' calls in one batch, the adapters' matmuls run).")


# ---- evaluate ---------------------------------------------------------------------------------------------------

# the demo's evaluation (Makefile: BUDGETS, DEV, TEST)
DEMO_BUDGETS = dict(subtasks=8, executor_turns=3, critic_retries=1, single_turns=12, new_tokens=320, context=2048)
DEMO_SPLITS = (("dev", 2), ("test", 1))  # (split, scenarios)
AGENTS = HERE / "ckpts" / "demo"
# (label, workers, max batch, weight dtype, LocalEngine options)
EVALUATE_SETTINGS = [
    ("one call at a time, unpadded", 1, 1, "float32", dict(deterministic=False)),
    ("deterministic, alone", 1, 1, "float32", dict(deterministic=True)),
    ("deterministic, batched", 8, 16, "float32", dict(deterministic=True)),
    ("deterministic, alone, bf16", 1, 1, "bfloat16", dict(deterministic=True)),
    ("deterministic, batched, bf16", 8, 16, "bfloat16", dict(deterministic=True)),
]


STEP_KV = 1200  # keys each sequence of the decode-step rows attends to


def _decode_steps(folder: str, dtype: torch.dtype) -> None:
    """Milliseconds per decode step of the model at `folder` (decoding layout): one unpadded row (decoding.hidden)
    against decoding.hidden_invariant's fixed-shape pieces of 16 and 32 rows, by sequences x fed tokens."""
    net = decoding.lay_out_for_decoding(model_io.load_model(folder, dtype=dtype).eval())
    caches = []
    for _ in range(4):
        cache = M.KVCache(net.config, 1, STEP_KV + 8, "cpu", dtype)
        with torch.inference_mode():
            net.hidden(torch.arange(100, 100 + STEP_KV)[None], cache)
        caches.append(cache)

    def best_ms(step) -> float:
        times = []
        for _ in range(4):  # the first round warms up
            for cache in caches:
                cache.length = STEP_KV
            start = time.perf_counter()
            with torch.inference_mode():
                step()
            times.append(time.perf_counter() - start)
        return min(times[1:]) * 1e3

    plain = [best_ms(lambda t=t: decoding.logits(net, decoding.hidden(net, torch.full((1, t), 5), caches[0])))
             for t in (1, 5)]
    name = str(dtype).removeprefix("torch.")
    print(f"  decode step, {name}, ms (KV length {STEP_KV}): unpadded one row: 1 token {plain[0]:.1f}, "
          f"1 + 4 drafts {plain[1]:.1f}")
    for rows in (16, 32):
        ms = [best_ms(lambda t=t, n=n: decoding.logits_invariant(
            net, decoding.hidden_invariant(net, [[5] * t] * n, caches[:n], rows), rows))
            for n, t in ((1, 1), (1, 5), (4, 1), (4, 5))]
        print(f"  invariant, pieces of {rows} rows: sequences x tokens 1x1 {ms[0]:.1f}, 1x5 {ms[1]:.1f}, "
              f"4x1 {ms[2]:.1f}, 4x5 {ms[3]:.1f}")


def bench_evaluate() -> None:
    import os

    import agents
    import evaluate
    import result_files
    import systems
    import trajectories
    import world
    if not (AGENTS / "planner").is_dir():
        print(f"evaluate: skipped, no trained system in {AGENTS} (run `make demo`, or pass --agents)")
        return
    root = world.world_root()
    spec = systems.system_spec(str(AGENTS))
    budgets = agents.Budgets(**DEMO_BUDGETS)
    print(f"evaluate: {AGENTS} on the mini-world's demo splits, {meter.machine(torch.device('cpu'))}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; budgets {DEMO_BUDGETS}")
    for dtype in (torch.float32, torch.bfloat16):
        _decode_steps(spec.models["executor"], dtype)
    print(f"  {'split':<5} {'setting':<30} {'tasks':>5} {'workers':>7} {'tasks/min':>9} {'ratio':>6} {'TGC':>6} "
          f"{'SGC':>6} {'same as alone':>13}")
    with tempfile.TemporaryDirectory() as tmp, world.WorldPool(max(s[1] for s in EVALUATE_SETTINGS),
                                                                root=root) as pool:
        for split, scenarios in DEMO_SPLITS:
            first, alone = None, {}  # alone: each dtype's deterministic trajectories decoded one call at a time
            for label, workers, max_batch, dtype, options in EVALUATE_SETTINGS:
                system = systems.load_system(spec, "cpu", dtype, options)
                out = Path(tmp) / f"{split}-{label}"
                cfg = evaluate.EvalConfig(split=split, out=str(out), root=str(root), workers=workers,
                                          max_batch=max_batch, scenarios=scenarios, quiet=True)
                start = time.perf_counter()
                metrics = evaluate.evaluate(system, budgets, cfg, pool=pool)["metrics"]
                rate = metrics["tasks"] / (time.perf_counter() - start) * 60
                first = first or rate
                records = [{**r, "calls": [{k: v for k, v in c.items() if k not in trajectories.MEASURED_CALL_FIELDS}
                                           for c in r["calls"]]}
                           for r in trajectories.read_trajectories(out / result_files.TRAJECTORIES)]
                records = sorted(records, key=lambda r: r["task_id"])
                same = "" if not options["deterministic"] else "(reference)" if dtype not in alone else (
                    "yes" if records == alone[dtype] else "NO")
                if options["deterministic"]:
                    alone.setdefault(dtype, records)
                print(f"  {split:<5} {label:<30} {metrics['tasks']:>5} {workers:>7} {rate:>9.2f} "
                      f"{rate / first:>5.2f}x {metrics['tgc']:>5.1f}% {metrics['sgc']:>5.1f}% {same:>13}", flush=True)
            if len(alone) == 2:
                same_tasks = sum(a == b for a, b in zip(*alone.values()))
                print(f"  {split:<5} bf16 and fp32 record the same trajectory on {same_tasks} of "
                      f"{len(alone['float32'])} tasks")
    print("  ratio: tasks/minute over the first row's. one call at a time: batched decoding with one world and one "
          "call per batch (each call decoded alone, unpadded, with prompt-lookup drafts and a token-granular "
          "prompt cache: at least as fast as decoding every call alone in aligned chunks). deterministic: "
          "evaluate.py's default, batch-invariant, so it records the same trajectories alone and batched "
          "(same as alone: as the same dtype's deterministic run alone; bf16: the weights in bf16, --dtype bfloat16).")


# ---- CLI --------------------------------------------------------------------------------------------------------

SECTIONS = {
    "decode": bench_decode,
    "lora": bench_lora,
    "train": lambda args: bench_train(str(REAL_MODEL) if (REAL_MODEL / "config.json").is_file() else None, args.data),
    "world": bench_world,
    "rollout": bench_rollout,
    "evaluate": bench_evaluate,
}


def main(argv=None) -> None:
    global REAL_MODEL, AGENTS
    ap = argparse.ArgumentParser(description="Benchmarks of prost against transformers/PEFT, section by section.")
    ap.add_argument("sections", nargs="*", metavar="section",
                    help=f"sections to run (default: all): {', '.join(SECTIONS)}")
    ap.add_argument("--real-model", default=str(REAL_MODEL),
                    help=f"HF folder of a real model (e.g. SmolLM2-135M-Instruct from `make fetch`) for the decode, "
                    f"train and rollout sections (default: {REAL_MODEL.relative_to(HERE)}; those rows are skipped "
                    "when it is absent)")
    ap.add_argument("--agents", default=str(AGENTS), help="evaluate: the trained system's checkpoint folder "
                    f"(default: {AGENTS.relative_to(HERE)}, which `make demo` writes; skipped when absent)")
    ap.add_argument("--data", default=str(TRAIN_DATA), help="train: gold trajectories (rollout.py collect --teacher "
                    "gold --split train --limit 12)")
    args = ap.parse_args(argv)
    REAL_MODEL, AGENTS = Path(args.real_model), Path(args.agents)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        sys.exit(2)
    for name in args.sections or SECTIONS:
        start = time.perf_counter()
        SECTIONS[name](args) if name == "train" else SECTIONS[name]()
        print(f"[{name}: {time.perf_counter() - start:.0f} s]\n")


if __name__ == "__main__":
    main()
