"""The CUDA-only decisions of training, taken on the CPU: a simulated one-GPU machine for cluster.py (LOCAL_RANK
against the device count, nccl's device and timeout), a checkpoint with a CUDA RNG state resumed on the CPU, the
precision a run's identity records, the peak-FLOPs table's exact GPU names (issue #30, items 3 to 6), and
gpu_check's collectives for a lone rank."""

import json
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import run_child, torchrun
from test_prost import base, config, trajectory_file  # noqa: F401  (fixtures and the run settings)

import cluster
import meter
import prost
import run_folder
import store


@pytest.fixture
def one_gpu(monkeypatch):
    """torch as it looks on a machine with one CUDA device: cuda:1 does not exist."""
    def set_device(device):
        if torch.device(device).index >= 1:
            raise RuntimeError("CUDA error: invalid device ordinal")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    joined = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    return joined


def torchrun_env(monkeypatch, rank: int, world: int) -> None:
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world)):
        monkeypatch.setenv(name, str(value))


def test_a_second_rank_on_a_one_gpu_machine_is_refused_in_one_line(one_gpu, monkeypatch):
    torchrun_env(monkeypatch, rank=1, world=2)
    with pytest.raises(ValueError, match="LOCAL_RANK 1 .* 1 CUDA device.*--device cpu") as error:
        cluster.start_cluster("auto")
    assert "\n" not in str(error.value) and not one_gpu  # refused before joining the group
    cluster.start_cluster("cpu")  # the gloo test's way: CPU processes, whatever GPUs there are
    assert one_gpu[-1][0] == "gloo"


def test_nccl_gets_the_ranks_device_and_a_timeout_longer_than_the_default_data_build(one_gpu, monkeypatch):
    torchrun_env(monkeypatch, rank=0, world=2)
    assert cluster.start_cluster("auto").device == torch.device("cuda:0")
    backend, kwargs = one_gpu[0]
    assert backend == "nccl" and kwargs["device_id"] == torch.device("cuda:0")
    assert kwargs["timeout"] == cluster.PROCESS_GROUP_TIMEOUT >= timedelta(minutes=30)


def test_a_cuda_rng_state_resumed_on_the_cpu_restores_the_cpu_generator_and_says_so(capsys):
    torch.manual_seed(7)
    saved = {"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
             "cuda": torch.zeros(16, dtype=torch.uint8)}  # what a CUDA run's state holds
    expected = torch.rand(3)
    torch.manual_seed(8)
    run_folder.restore_rng([saved], cluster.Cluster(0, 1, torch.device("cpu")))
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    assert "resuming on the CPU a run saved on CUDA" in capsys.readouterr().out


def test_the_run_identity_records_the_resolved_precision(base, trajectory_file, tmp_path):  # noqa: F811
    settings = dict(epochs=2, schedule="full", stop_after_epochs=1)
    prost.train(config(base, trajectory_file, tmp_path, precision="auto", **settings))
    assert json.loads((tmp_path / "planner" / store.IDENTITY_FILE).read_text())["precision"] == "fp32"
    # in bf16 it is another run; asked for as fp32 explicitly, the same one
    with pytest.raises(ValueError, match="different run.*precision"):
        prost.train(config(base, trajectory_file, tmp_path, precision="bf16", resume=True, **settings))
    assert len(prost.train(config(base, trajectory_file, tmp_path, precision="fp32", resume=True, epochs=2,
                                  schedule="full"))) == 2


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA H100 SXM5 engineering sample", None), ("NVIDIA L40", None),  # not listed: no neighbour's figure
])
def test_peak_flops_match_the_exact_gpu_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = meter.peak_flops(torch.device("cuda:0"), 0.0)
    assert peak == (tflops * 1e12 if tflops else None)
    assert meter.peak_flops(torch.device("cuda:0"), 500.0) == 500e12  # --peak-tflops wins


def test_a_lone_torchrun_rank_runs_the_collectives_in_a_group_of_one(tmp_path):
    """What gpu_check's collectives row does on a one-GPU machine, on the CPU: start_cluster joins no group for
    one process, so the row joins one of its own and still runs a barrier, an all_gather_object and an
    all_reduce through torch.distributed."""
    out = tmp_path / "collectives.pt"
    run_child(torchrun(1, "gpu_check.py", "--collectives-worker", str(out), "--device", "cpu"))
    got = torch.load(out)
    assert (got["world"], got["backend"], got["sum"]) == (1, "gloo", [1.0, 1.0, 1.0])
    assert got["gathered"] == [{"rank": 0, "device": "cpu"}]
