"""Output folders: one writer each, complete or resumable after a kill, refused up front when they cannot work.

The references are the operating system itself: a second process really holding the lock (and really
killed with SIGKILL), a training process really killed by SIGKILL at the moment a checkpoint file is about
to be renamed into place, a really read-only mount and a really full filesystem (a tmpfs in a private
mount namespace; we run as root, and permission bits do not stop root, so a chmod-based test would prove
nothing here), and an uninterrupted run to compare the resumed one with.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import lora
import prost
import run_folder
import store
import systems
from test_prost import adapter_tensors, base, cli_args, config, trajectory_file  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds, for every subprocess

HOLD_LOCK = """
import sys, time
sys.path.insert(0, sys.argv[1])
import store
with store.OutputLock(sys.argv[2], folder=sys.argv[3] == "folder"):
    print("locked", flush=True)
    time.sleep(120)
"""


@contextmanager
def lock_held_elsewhere(target: Path, folder: bool = True):
    """A separate process holding the lock of `target` (a folder, or a file) while the block runs; yields
    that process."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(REPO), str(target), "folder" if folder else "file"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    folder = tmp_path / "held"
    with lock_held_elsewhere(folder) as proc:
        with pytest.raises(store.OutputBusy, match=f"{folder} is in use by process {proc.pid} on "):
            with store.OutputLock(folder):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        assert json.loads((folder / store.LOCK_FILE).read_text())["pid"] == proc.pid  # left by the dead
        with store.OutputLock(folder):
            assert json.loads((folder / store.LOCK_FILE).read_text())["pid"] == os.getpid()
            with store.OutputLock(folder):  # re-entrant within one process
                pass
            assert (folder / store.LOCK_FILE).exists()
        assert not (folder / store.LOCK_FILE).exists()


def test_prost_refuses_a_folder_in_use_before_reading_any_data(base, trajectory_file, tmp_path, capsys):
    with lock_held_elsewhere(tmp_path / "ck" / "planner") as proc:
        assert prost.main(cli_args(base, trajectory_file, tmp_path / "ck")) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and f"is in use by process {proc.pid}" in err
        assert "examples from" not in captured.out  # refused before the data was read
        assert [p.name for p in (tmp_path / "ck" / "planner").iterdir()] == [store.LOCK_FILE]


def test_out_that_is_a_file_is_refused_up_front(base, trajectory_file, tmp_path, capsys):
    (tmp_path / "ck").write_text("not a folder")
    assert prost.main(cli_args(base, trajectory_file, tmp_path / "ck")) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"error: --out {tmp_path / 'ck' / 'planner'}: {tmp_path / 'ck'} is a file, "
                                    "not a folder; choose another --out")
    assert "examples from" not in captured.out


def test_refused_input_leaves_no_folder_behind(base, trajectory_file, tmp_path, capsys):
    assert prost.main(cli_args(base, trajectory_file, tmp_path / "ck", data=str(tmp_path / "missing.jsonl"))) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------------------------------
# A read-only and a full filesystem, for real: a tmpfs mounted in a private mount namespace.

def can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True,
                           timeout=TIMEOUT)
    return probe.returncode == 0


def prost_on_tmpfs(mount_options: str, mount_point: Path, args: list[str]) -> subprocess.CompletedProcess:
    """prost.py run with `mount_point` replaced by a fresh tmpfs, visible to that process only."""
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", mount_options, str(mount_point),
                           sys.executable, "prost.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.skipif(not can_mount(), reason="needs `unshare -rm` (user + mount namespaces) to mount a tmpfs")
@pytest.mark.parametrize("options, message", [
    ("ro,size=1m", "is not writable (Read-only file system); choose another --out"),
    ("size=256k", "KiB free but the first checkpoint needs about 1.1 MiB; free some space or choose another --out"),
])
def test_read_only_or_full_out_is_refused_before_training(base, trajectory_file, tmp_path, options, message):
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    run = prost_on_tmpfs(options, mount_point, cli_args(base, trajectory_file, mount_point / "ck", epochs=1,
                                                        subtasks_per_epoch=4))
    assert run.returncode == 2, run.stderr
    err = run.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --out ") and message in err, err
    assert "Traceback" not in err and "examples from" not in run.stdout


def test_checkpoint_size_estimate_covers_what_a_checkpoint_takes(base, trajectory_file, tmp_path):
    cfg = config(base, trajectory_file, tmp_path, epochs=1, subtasks_per_epoch=4)
    prost.train(cfg)
    written = sum(p.stat().st_size for p in (tmp_path / "planner").iterdir())
    assert written <= run_folder.checkpoint_bytes(cfg.model, cfg.lora_r) <= written + (2 << 20)


# ----------------------------------------------------------------------------------------------------
# kill -9 while a checkpoint is written.

KILL_BEFORE_RENAME = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import prost
real_replace, target = os.replace, sys.argv[2]
def replace(src, dst):
    if os.path.basename(dst) == target:  # the temp file is complete and fsync'd; the rename never happens
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
sys.exit(prost.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("killed_at", [prost.STATE_FILE, lora.ADAPTER_WEIGHTS, store.PROGRESS_FILE])
def test_kill_during_the_first_checkpoint_leaves_a_folder_resume_finishes(base, trajectory_file, tmp_path,
                                                                           killed_at):
    settings = dict(epochs=1, subtasks_per_epoch=4, schedule="full")
    straight = prost.train(config(base, trajectory_file, tmp_path / "straight", **settings))
    out = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", KILL_BEFORE_RENAME, str(REPO), killed_at,
                          *cli_args(base, trajectory_file, out, **settings)], cwd=REPO, capture_output=True,
                         text=True, timeout=TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == -signal.SIGKILL, run.stderr
    folder = out / "planner"
    assert any(store.is_temp_file(p) and p.name.startswith(f".{killed_at}.") for p in folder.iterdir())
    assert json.loads((folder / store.LOCK_FILE).read_text())["pid"] != os.getpid()  # the dead run's lock
    if (folder / lora.ADAPTER_CONFIG).exists():  # adapter files without their progress record: not evaluable
        with pytest.raises(ValueError, match="checkpoint write was interrupted"):
            systems.adapter_provenance(str(folder), "planner", allow_unfinished=False)
    resumed = prost.train(config(base, trajectory_file, out, resume=True, **settings))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    a, b = adapter_tensors(tmp_path / "straight" / "planner"), adapter_tensors(folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [run_folder.RUN_FILE, run_folder.LOG_FILE, prost.STATE_FILE, store.PROGRESS_FILE, lora.ADAPTER_CONFIG,
         lora.ADAPTER_WEIGHTS])  # temp files and the stale lock are gone
    provenance = systems.adapter_provenance(str(folder), "planner", allow_unfinished=False)
    assert provenance["training"] == {"epoch": 1, "epochs": 1} and provenance["unfinished"] is None


# ----------------------------------------------------------------------------------------------------
# Unfinished and non-finite adapters.

def test_an_adapter_of_a_stopped_run_is_refused_unless_allowed(base, trajectory_file, tmp_path):
    prost.train(config(base, trajectory_file, tmp_path, epochs=3, subtasks_per_epoch=4, stop_after_epochs=1))
    folder = str(tmp_path / "planner")
    with pytest.raises(ValueError, match=r"planner's adapter .* unfinished training run: its training run stopped "
                                         r"after epoch 1 of 3 \(stopped by --stop-after-epochs 1\)"
                                         r".*--allow-unfinished"):
        systems.adapter_provenance(folder, "planner", allow_unfinished=False)
    provenance = systems.adapter_provenance(folder, "planner", allow_unfinished=True)
    assert provenance["training"] == {"epoch": 1, "epochs": 3} and "after epoch 1 of 3" in provenance["unfinished"]
    assert provenance["sha256"] == store.files_sha256(folder, [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS])
    prost.train(config(base, trajectory_file, tmp_path, epochs=3, subtasks_per_epoch=4, resume=True))
    assert systems.adapter_provenance(folder, "planner", allow_unfinished=False)["unfinished"] is None


def test_a_diverged_run_marks_its_adapter_unfinished(base, trajectory_file, tmp_path, monkeypatch):
    prost.train(config(base, trajectory_file, tmp_path, epochs=3, subtasks_per_epoch=4, stop_after_epochs=1))
    real = prost.target_token_losses
    monkeypatch.setattr(prost, "target_token_losses", lambda m, i, k, t: (real(m, i, k, t)[0] * float("nan"),
                                                                       real(m, i, k, t)[1]))
    with pytest.raises(prost.TrainingDiverged):
        prost.train(config(base, trajectory_file, tmp_path, epochs=3, subtasks_per_epoch=4, resume=True))
    with pytest.raises(ValueError, match=r"stopped after epoch 1 of 3 \(diverged: non-finite loss or gradient "
                                         r"in epoch 2\)"):
        systems.adapter_provenance(str(tmp_path / "planner"), "planner", allow_unfinished=False)


def test_a_checkpoint_holding_nan_is_refused_naming_the_tensor(base, trajectory_file, tmp_path, capsys):
    prost.train(config(base, trajectory_file, tmp_path, epochs=2, subtasks_per_epoch=4, stop_after_epochs=1))
    state_path = tmp_path / "planner" / prost.STATE_FILE
    state = torch.load(state_path, weights_only=True)
    name = sorted(state["adapter"])[3]
    state["adapter"][name][0, 0] = float("nan")
    torch.save(state, state_path)
    assert prost.main(cli_args(base, trajectory_file, tmp_path, epochs=2, subtasks_per_epoch=4, resume=True)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"tensor {name} holds 1 non-finite value(s)" in err


# ----------------------------------------------------------------------------------------------------
# JSONL pieces.

def test_drop_lines_keeps_other_lines_byte_for_byte_and_drops_a_torn_tail(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = ['{"task_id": "a", "n": 1}\n', '{"task_id":"b"}\n', '{"task_id": "c", "x": "\\u00e9"}\n']
    path.write_text("".join(lines) + '{"task_id": "d", "tor')
    assert store.drop_lines(path, lambda r: r is not None and r["task_id"] == "b") == 2
    assert path.read_text() == lines[0] + lines[2]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_atomic_write_gives_the_mode_open_gives_under_the_umask(tmp_path, umask):
    # the reference: a file the same process creates with plain open() under the same umask
    # a text, and a writer that makes its own file (safetensors' save_file, as checkpoints are written)
    script = (f"import os, sys, torch; os.umask({umask}); sys.path.insert(0, {str(REPO)!r}); import store; "
              f"from safetensors.torch import save_file; open({str(tmp_path / 'plain')!r}, 'w').close(); "
              f"store.atomic_write({str(tmp_path / 'atomic')!r}, 'x'); "
              f"store.atomic_write({str(tmp_path / 'tensors')!r}, lambda tmp: save_file({{'a': torch.zeros(2)}}, tmp))")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=TIMEOUT)
    plain, atomic, tensors = (os.stat(tmp_path / name).st_mode & 0o777 for name in ("plain", "atomic", "tensors"))
    assert atomic == tensors == plain == 0o666 & ~umask
