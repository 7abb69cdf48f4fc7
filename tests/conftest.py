"""Shared test fixtures: tiny random Hugging Face checkpoints and a ChatML tokenizer, built with the oracles,
the one way tests start child processes (`run_child`, `torchrun`), and the one tolerance rule for sums computed
in two orders (`assert_reordered_sums_close`).

The checkpoints are made by transformers' own Qwen2ForCausalLM / LlamaForCausalLM and `save_pretrained`, and the
tokenizer by the `tokenizers` library directly, so tests compare prost against files it did not write.
Builders are plain functions (usable from any test file) plus session-scoped fixtures that build them once.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The suite is the CPU contract; `make gpu-check` (gpu_check.py) is the CUDA one. On a GPU machine every test, and
# every child it starts, sees no CUDA device, so `--device auto` means the CPU there too (fp32, bit-exact resume,
# no MFU, gloo ranks) rather than bf16 on cuda:LOCAL_RANK. Set before anything initialises CUDA.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules (model.py, ...)

from cluster import child_env  # noqa: E402  (the product's own launch environment, shared with gpu_check.py)

if os.geteuid() != 0:  # the full sandbox needs root (tests/test_sandbox.py then skips); the other tests run
    os.environ.setdefault("PROST_UNSAFE_WEAK_SANDBOX", "1")  # gold and tiny random models' code, as before

CORPUS = [
    "The planner splits the task into sub-tasks; the executor writes code for each one.",
    "The critic reads the output and says whether the sub-task succeeded.",
    "apis.spotify.login(username='alice', password='hunter2') returned an access token.",
    "print(apis.venmo.show_transactions(page_index=0))  # 12 transactions",
    "Hello world! Ünïcödé text, tabs\tand\nnewlines, numbers 0123456789.",
]

# A ChatML template that, like Qwen2.5-Instruct's, inserts a default system message when none is given
# (written for these tests; the default message is deliberately not Qwen's).
DEFAULT_SYSTEM = "You are a careful test assistant."
TEMPLATE_WITH_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TEMPLATE_PLAIN = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_chatml_tokenizer(out_dir, template=TEMPLATE_WITH_DEFAULT_SYSTEM, vocab_size=320) -> Path:
    """A byte-level BPE tokenizer folder with <|endoftext|>, <|im_start|>, <|im_end|> specials (tokenizers lib)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": template}))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))
    return out


def build_hf_checkpoint(out_dir, arch="qwen2", tie=True, max_shard_size=None, seed=0, vocab_size=None,
                        max_positions=256):
    """A tiny random transformers model saved with save_pretrained (+ the ChatML tokenizer); returns (dir, model).

    Every parameter (biases and norm weights included) is randomised so that each one matters to the logits.
    """
    import transformers
    out = Path(out_dir)
    build_chatml_tokenizer(out)
    vocab_size = vocab_size or 320
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  tie_word_embeddings=tie, rms_norm_eps=1e-6, eos_token_id=2, bos_token_id=None, pad_token_id=0)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        cls = transformers.Qwen2ForCausalLM
    elif arch == "llama":
        config = transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out, model


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory):
    """Qwen2: q/k/v bias, GQA 4/2, tied embeddings."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", tie=True)


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    """Llama: untied embeddings, llama3 RoPE scaling, GQA 4/2."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama", tie=False, seed=1)


@pytest.fixture(scope="session")
def sharded_ckpt(tmp_path_factory):
    """Qwen2 split over several safetensors shards (model.safetensors.index.json)."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("sharded"), "qwen2", tie=False, max_shard_size="40KB", seed=2)


# ---------------------------------------------------------------------------------------------------------
# The mini-world (miniworld.py's generator), built once for the whole test session, and the gold-teacher
# trajectories of its train split (rollout.py collect), collected once. Tests that change a world build their own.

@pytest.fixture(scope="session")
def world_build(tmp_path_factory):
    """(root, build summary) of the mini-world with seed 0 and a fixed secret, so that every test session runs the
    same held-out variants."""
    import miniworld
    root = tmp_path_factory.mktemp("miniworld")
    return root, miniworld.build_world(root, seed=0, secret="prost-tests")


@pytest.fixture(scope="session")
def mini_world(world_build):
    return world_build[0]


@pytest.fixture(scope="session")
def world_pool(mini_world):
    """Two world sessions (worker processes) on the shared mini-world."""
    import world
    with world.WorldPool(2, root=mini_world) as pool:
        yield pool


@pytest.fixture(scope="session")
def micro(mini_world, tmp_path_factory):
    """A random-init micro model whose tokenizer is trained on the protocol's own prompts and the dev split's
    instructions (for rollouts and evaluations that need a model, not a good one)."""
    import agents
    import model_io
    import world
    texts = [agents.API_RULES, agents.PLANNER_FORMAT_REMINDER, agents.SINGLE_CODE_REMINDER]
    for task_id in world.load_split("dev", root=mini_world):
        spec = json.loads((mini_world / "data" / "tasks" / task_id / "specs.json").read_text())
        texts.append(spec["instruction"])
    return model_io.init_tiny(tmp_path_factory.mktemp("micro"), texts, preset="micro", seed=0)


@pytest.fixture(scope="session")
def gold_train(mini_world, world_pool, tmp_path_factory):
    """Gold-teacher trajectories for the whole train split: (collect summary, path)."""
    import agents
    import rollout
    out = tmp_path_factory.mktemp("gold") / "train.jsonl"
    system = rollout.teacher_system("gold", root=mini_world)
    summary = rollout.collect(system, "train", out, agents.Budgets(), root=mini_world, pool=world_pool)
    return summary, out


@pytest.fixture(scope="session")
def tiny_model(gold_train, tmp_path_factory):
    """A random-init micro model whose tokenizer is trained on the gold trajectories' text (rollouts of
    agents.py and rollout.py)."""
    import model_io
    import trajectories
    records = trajectories.read_trajectories(gold_train[1])
    texts = [m["content"] for r in records for c in r["calls"] for m in c["messages"] + [
        {"content": c["output"]}]]
    return model_io.init_tiny(tmp_path_factory.mktemp("micro"), texts, preset="micro", seed=0)


# ---------------------------------------------------------------------------------------------------------
# Child processes (CLIs, torchrun). Each runs in a session of its own under a hard time limit, in
# cluster.child_env's environment (one thread per process, none of the caller's launcher variables); a
# failure or a timeout fails the test showing the command and the end of its output, and nothing it started
# outlives it.

CHILD_TIMEOUT_S = 600  # ~15x what the slowest child needs on 2 idle cores: a hang fails, a busy machine does not
SHOWN_OUTPUT_CHARS = 6000


def flop_counter():
    """torch's FlopCounterMode, also counting the in-place addmm_ that adds an adapter's B u into the base
    output (torch's table has no entry for it) with torch's own addmm formula."""
    from torch.utils.flop_counter import FlopCounterMode, addmm_flop

    def addmm_in_place(*args, **kwargs):
        return addmm_flop(*args, **kwargs)
    addmm_in_place._get_raw = True  # addmm_flop already takes tensors: FlopCounterMode must not wrap it again
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_in_place})


FP32_EPS = torch.finfo(torch.float32).eps  # 2**-23: the spacing of fp32 numbers just above 1


def assert_reordered_sums_close(actual: torch.Tensor, expected: torch.Tensor, n_terms: int) -> None:
    """`actual` and `expected` hold the same sums of `n_terms` fp32 terms per element, added in another order
    (other micro-batch shapes, a shared prefix, recomputed blocks, compiled kernels, another CPU's matmul
    blocking). Each addition rounds by at most eps relative, and the rounding errors of a long sum add up like a
    random walk, so two orders differ by about sqrt(n) * eps * the size of the terms (Higham, Accuracy and
    Stability of Numerical Algorithms, sections 3.1 and 4.2). A gradient element is a sum over the step's
    token positions, and its terms are taken to be as large as the tensor's largest element: an element near
    zero, whose terms cancel, gets the tolerance of its terms, not of its own tiny value. A real difference (a
    target masked wrongly, a term missing) moves elements by a fraction of the largest one, far above this."""
    atol = n_terms * FP32_EPS * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def cpu_model_name() -> str:
    """This machine's CPU as /proc/cpuinfo names it (what timings must be reported next to)."""
    with open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    """The command line of `torch.distributed.run` for `nproc` processes on this machine.

    --standalone hosts the rendezvous store on port 0, so the OS hands each run a free port of its own: runs
    of other tests, other checkouts or other users on the machine never meet (a fixed --master-port makes
    the second concurrent run fail, or worse, join the first)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            script, *args]


def _tail(text: str) -> str:
    return text if len(text) <= SHOWN_OUTPUT_CHARS else "...\n" + text[-SHOWN_OUTPUT_CHARS:]


def run_child(args: list[str], *, expect_rc: int | None = 0, timeout: float = CHILD_TIMEOUT_S, cwd=REPO,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `args` to completion and return it (stdout, stderr as text).

    The child leads a new session, so a timeout (or the test being interrupted) kills the whole tree it
    started, torchrun's workers and world workers included, instead of leaving them holding CPUs and ports.
    `expect_rc=None` accepts any exit code."""
    proc = subprocess.Popen(args, cwd=cwd, env=child_env() if env is None else env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_session(proc)
        out, err = proc.communicate()
    finally:
        _kill_session(proc)  # leftovers of a finished child, or everything on KeyboardInterrupt
    if timed_out or (expect_rc is not None and proc.returncode != expect_rc):
        rc = proc.returncode
        why = (f"timed out after {timeout:.0f} s" if timed_out else
               f"exited with {rc}" + (f" ({signal.Signals(-rc).name})" if rc < 0 and -rc in signal.valid_signals()
                                      else "") + f", expected {expect_rc}")
        pytest.fail(f"{why}: {' '.join(map(str, args))}\n--- stdout\n{_tail(out)}\n--- stderr\n{_tail(err)}",
                    pytrace=False)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
@pytest.fixture(scope="session")
def tiny_preset_model(gold_train, tmp_path_factory):
    """The demo's base: the tiny preset (4096 positions), random init, its tokenizer trained on the gold
    train trajectories' text as `make demo` does (data.py texts, then model_io.py init-tiny)."""
    import data
    import model_io
    import trajectories
    texts = data.trajectory_texts(trajectories.read_trajectories(gold_train[1]))
    return model_io.init_tiny(tmp_path_factory.mktemp("tiny"), texts, preset="tiny", seed=0)
