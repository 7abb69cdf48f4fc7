"""gpu_check.py on the CPU: the GPU check runs between GPU loans only here, so its code must not rot.

The same checks as on a GPU, at tiny shapes (--device cpu --tiny): prost against its fp32 CPU logits and
against transformers, bf16 autocast training against fp32, the default recipe's step, save and resume, --compile,
two gloo processes under torchrun against one, collectives, batched generation against one prompt at a time,
evaluation's decoding path against plain decoding, and an evaluate.py run on the mini-world. A broken path
must turn the table red, and a machine without CUDA gets one line and exit code 0 from `make gpu-check`.
"""

import sys

import torch

import gpu_check
import lora
from cluster import child_env
from conftest import REPO, run_child


def table_rows(text: str) -> dict[str, list[str]]:
    """The printed table as {check: [status, ...]} (a check can have a row per shape)."""
    rows = {}
    for line in text.splitlines():
        cells = line.split("  ")
        cells = [c.strip() for c in cells if c.strip()]
        if len(cells) >= 3 and cells[2] in ("PASS", "FAIL", "SKIP", "INFO"):
            rows.setdefault(cells[0], []).append(cells[2])
    return rows


def test_every_check_passes_at_tiny_shapes_on_the_cpu(mini_world, capsys):
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--world-root", str(mini_world)])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rc == 0, out
    expected = {
        "logits fp32 cpu vs cpu fp32": ["PASS", "PASS"],  # one row per tiny shape
        "logits bf16 cpu vs cpu fp32": ["PASS", "PASS"],
        "logits fp32 vs transformers cpu": ["PASS", "PASS"],
        "train bf16 autocast vs fp32, 64 tokens": ["PASS"],
        "train fused AdamW": ["PASS"],
        "train speed bf16, 64 tokens": ["INFO"],
        "train shared trunk vs separate rows fp32, 4 x 64 tokens": ["PASS"],
        "train default recipe, 4 rows up to 64 tokens, dropout 0.05": ["PASS"],
        "train save and resume": ["PASS"],
        "train --compile vs eager fp32, 32 tokens": ["PASS"],
        "ddp gloo x2 vs 1 process": ["PASS"],
        "collectives gloo x2: barrier, all_gather_object, all_reduce": ["PASS"],
        "generate batched vs one-at-a-time float32": ["PASS"],
        "generate batched vs one-at-a-time bfloat16": ["INFO"],
        "decode bf16, prompt 16, 8 new": ["INFO"],
        "generate mixed adapters vs per-adapter batches float32": ["PASS"],
        "evaluation decoding vs plain float32": ["PASS"],
        "evaluation decoding vs plain bfloat16": ["INFO"],
        "world evaluation (random micro model)": ["PASS"],
    }
    assert rows == expected, out
    # every row that runs attention names the kernel it ran
    for check in ("train speed bf16", "train default recipe", "train --compile", "generate batched vs one-at-a-time",
                  "evaluation decoding"):
        assert all("attention: cpu flash" in line for line in out.splitlines() if line.startswith(check)), check


def test_an_adapter_ignored_by_the_forward_pass_fails_against_transformers(monkeypatch, capsys):
    """transformers gets the merged weights, so prost's logits without the adapter must disagree."""
    def base_only(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)
    monkeypatch.setattr(lora.LoRALinear, "forward", base_only)
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--only", "logits"])
    out = capsys.readouterr().out
    assert rc == 1
    assert table_rows(out)["logits fp32 vs transformers cpu"] == ["FAIL", "FAIL"], out


def test_an_old_torch_gets_one_line_instead_of_a_failing_table(monkeypatch, capsys):
    monkeypatch.setattr(torch, "__version__", "2.3.1+cu121")
    assert gpu_check.main(["--device", "cpu", "--tiny"]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "older than 2.5" in out


def test_make_gpu_check_without_cuda_prints_one_line_and_exits_0():
    no_cuda = child_env(CUDA_VISIBLE_DEVICES="")  # what a CPU-only machine looks like, even on a GPU machine
    run = run_child(["make", "-s", "gpu-check"], cwd=REPO, env=no_cuda)
    assert run.stdout.strip().count("\n") == 0 and "no CUDA device" in run.stdout, run.stdout
    direct = run_child([sys.executable, "gpu_check.py", "--only", "logits"], cwd=REPO, env=no_cuda)
    assert direct.stdout == run.stdout
