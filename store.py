"""store.py: how prost writes to disk, so every output folder is complete, resumable or absent.

Where this sits: under everything that leaves files behind. prost.py writes one adapter per role
(`ckpts/<role>/`), evaluate.py one evaluation folder (`results/<name>/`), rollout.py collect one trajectory
file, model.py and lora.py model and adapter folders. Their numbers are only as trustworthy as those
files, so the rules live here, once, and this file imports nothing else from prost (stdlib only):

- `atomic_write`: a temp file beside the target, fsync'd, renamed over it; readers see the old file or
  the new one, never half of one. `make_readable` gives such a temp file (or folder) the umask's mode;
  `clean_temp_files` removes the temp files a killed writer leaves.
- `append_lines`: durable JSONL appends (several lines as one write); `repair_torn_tail` first ends or
  drops a last line torn by a crash. `json_line` writes any value, invalid Unicode included, as valid UTF-8.
- `OutputLock`: one writer per output folder or file (an `flock`'d lock file holding pid, host and command);
  a second writer is refused with a line naming the holder; the kernel drops the lock when its holder dies,
  so a lock left by a killed run is simply taken over.
- `check_writable`: an `--out` that is a file, cannot be written, or lacks the space for the first
  checkpoint is refused before any work.
- `check_identity`: a folder records what produced it (`run.json`); a run with another identity is refused
  with the fields that differ, so two runs never mix in one folder. Inputs count by content, not by path,
  so a run still resumes after its folders moved.
- `PROGRESS_FILE`: how far the training run behind an adapter got, tied to the adapter's content hash, so
  an adapter from an unfinished (or half-written) run is recognised as such.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"  # inside a locked folder; a locked file `x.jsonl` uses `.x.jsonl.lock` beside it
IDENTITY_FILE = "run.json"
PROGRESS_FILE = "progress.json"
TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_write's mkstemp names look like


# ----------------------------------------------------------------------------------------------------
# Atomic files.

def atomic_write(path: str | Path, content) -> None:
    """Write `content` (str, bytes, or a function called with a temp file's path) to a temp file beside
    `path`, flush it to disk, then rename it over `path` and sync the folder: readers, and a run resumed
    after a crash, see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if isinstance(content, str):
            Path(tmp).write_text(content, encoding="utf-8", errors="backslashreplace")  # a lone surrogate: \udcxx
        elif isinstance(content, bytes):
            Path(tmp).write_bytes(content)
        else:
            content(tmp)
        make_readable(Path(tmp))  # after writing: a writer may replace the file (safetensors' save_file does)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it: done once, before any thread writes files
    os.umask(umask)
    return umask


UMASK = _read_umask()


def make_readable(path: Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (private to its owner: results, reports and checkpoints
    other users of a shared machine could not read) the mode open() or mkdir() gives under the umask."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~UMASK)


def sync_folder(folder: Path) -> None:
    """fsync a folder so a rename inside it survives a power loss (not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_temp_file(path: Path) -> bool:
    return bool(TEMP_FILE.match(path.name))


def clean_temp_files(folder: str | Path) -> list[str]:
    """Remove the temp files an interrupted `atomic_write` left in `folder` (call it holding the folder's
    lock: then no live writer owns them). Returns their names."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and is_temp_file(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    return [p.name for p in stale]


def bookkeeping(path: Path) -> bool:
    """Files of the machinery rather than of the output: the lock and temp files."""
    return path.name == LOCK_FILE or is_temp_file(path)


# ----------------------------------------------------------------------------------------------------
# JSONL files appended line by line.

def repair_torn_tail(path: str | Path) -> int:
    """Make the file end on a complete line before appending; return the bytes dropped.

    A crash in the middle of a write leaves a last line without its newline. If that tail still parses
    as a JSON object it was complete and only gets its newline back; otherwise it is cut off.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        text = f.read()
        if text.endswith(b"\n"):
            return 0
        start = text.rfind(b"\n") + 1  # 0 when the torn line is the only one
        tail = text[start:]
        if isinstance(parse_line(tail.decode("utf-8", errors="replace")), dict):
            f.write(b"\n")
            dropped = 0
        else:
            f.truncate(start)
            dropped = len(tail)
        f.flush()
        os.fsync(f.fileno())
    return dropped


def parse_line(line: str):
    """The JSON value on a line, or None if the line is not valid JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def json_line(obj) -> str:
    """`obj` as one line of JSON text that is always valid UTF-8: readable characters as they are, but a string
    holding a lone surrogate (a model's output can) escaped as JSON's \\udcxx, which reads back the same."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj)
    return text + "\n"


def append_lines(path: str | Path, objects: list) -> None:
    """Append one JSON line per object in a single write, flushed and fsync'd; a torn last line left by an
    earlier crash is repaired first (reported on stderr when bytes are dropped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dropped = repair_torn_tail(path)
    if dropped:
        print(f"{path}: dropped a torn last line ({dropped} bytes) left by an interrupted write", file=sys.stderr)
    text = "".join(json_line(obj) for obj in objects)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)  # one write: a crash can only tear the end of the file
        f.flush()
        os.fsync(f.fileno())


def drop_lines(path: str | Path, drop) -> int:
    """Rewrite a JSONL file (atomically) without the lines whose object `drop(obj)` is true, and without a
    torn last line; every other line is kept byte for byte. Returns the lines dropped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and not drop(parse_line(line))]
    if len(kept) < len(lines):
        atomic_write(path, "".join(kept))
    return len(lines) - len(kept)


# ----------------------------------------------------------------------------------------------------
# One writer per output.

class OutputBusy(ValueError):
    """Another live process holds the output's lock."""


class OutputLock:
    """An exclusive `flock` on a lock file: on `OUT/.lock` for a folder, on `.NAME.lock` beside a file.

    The holder writes its pid, host and command line into the lock file, so a refused writer can name it.
    The kernel releases an flock when its holder exits, however it exits (kill -9 included), so a lock file
    left by a dead run does not block: the next writer takes it and overwrites the holder line. A clean
    exit deletes the lock file while still holding it; a writer that meanwhile locked the deleted file
    notices (its inode is no longer the path's) and locks a new one, so two writers never hold two different
    files. Re-entrant within one process: evaluate.py's CLI locks before loading models and `evaluate()`
    locks again.
    """

    _held: dict[str, list] = {}  # lock path -> [open file, depth] in this process

    def __init__(self, target: str | Path, *, folder: bool = True):
        self.target = Path(target)
        self.path = self.target / LOCK_FILE if folder else self.target.with_name(f".{self.target.name}.lock")

    def __enter__(self) -> "OutputLock":
        key = str(self.path.resolve())
        if key in self._held:
            self._held[key][1] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise OutputBusy(f"{self.target} is in use by {describe_holder(holder)}; wait for it to finish "
                             "or choose another --out") from None
        if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(f.fileno()).st_ino:
            f.close()  # the lock file was removed (by a run that created and then left the folder) meanwhile
            return self.__enter__()
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
                + "\n")
        f.flush()
        os.fsync(f.fileno())
        self._held[key] = [f, 1]
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.path.resolve())
        entry = self._held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]
            self.path.unlink(missing_ok=True)  # still holding it: see the class docstring
            entry[0].close()  # closing the descriptor releases the flock


def describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"process {h['pid']} on {h['host']} (`{h['command']}`, since {h['since']})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "another process (it is still writing its details)"


@contextmanager
def exclusive_output(out: str | Path, *, need_bytes: int = 0, is_main: bool = True, first_error=lambda e: e):
    """Check `out` (check_writable), lock it for the whole block and clear temp files a killed writer
    left. A folder this call created and that ends up empty is removed again, so a run refused for bad
    input leaves no trace. Under data parallelism only the main process checks and
    locks; `first_error(own error or None)` must return the first error of all processes (an all-gather),
    so that every process stops together."""
    out = Path(out)
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None) if is_main else None
    lock, error = OutputLock(out), None
    if is_main:
        try:
            check_writable(out, need_bytes)
            lock.__enter__()
            clean_temp_files(out)
        except ValueError as e:
            error = str(e)
    agreed = first_error(error)
    try:
        if agreed:
            raise ValueError(agreed)
        yield
    finally:
        if is_main and not error:
            lock.__exit__(None, None, None)
        if created:
            remove_empty_folders(out, created)


def remove_empty_folders(folder: Path, top: Path) -> None:
    """rmdir `folder` and its parents up to `top` while they are empty."""
    for p in [folder, *folder.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return


# ----------------------------------------------------------------------------------------------------
# Up-front checks of an output location.

def check_writable(out: str | Path, need_bytes: int = 0, what: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot hold the run: a file where a folder is
    needed, a location this process cannot create or write files in (read-only mount, permissions), or
    a filesystem with less than `need_bytes` free. Creates the folder (kept: the run writes there next).
    Writability is tested by writing a file, not with os.access, which says yes to root on folders whose
    permission bits say no and cannot see every reason a write fails."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{what} {out}: {parent} is a file, not a folder; choose another {what}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {out} is not writable ({e.strerror or e}); choose another {what}") from None
    free = shutil.disk_usage(out).free
    if need_bytes and free < need_bytes:
        raise ValueError(f"{what} {out} has {format_bytes(free)} free but the first checkpoint needs about "
                         f"{format_bytes(need_bytes)}; free some space or choose another {what}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------------------------------
# What a folder holds: its identity, and file contents.

def identity_differences(saved, current, prefix: str = "") -> list[str]:
    """'field: X there vs Y now' for every leaf that differs between two JSON-like values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += identity_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if saved != current:
        return [f"{prefix.rstrip('.')}: {json.dumps(saved)} there vs {json.dumps(current)} now"]
    return []


def read_json_record(path: Path, fix: str) -> dict | None:
    """A record file of an output folder (None when absent); a corrupt one is a one-line error saying `fix`."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is corrupt (not JSON); {fix}") from None


def read_identity(folder: str | Path) -> dict | None:
    return read_json_record(Path(folder) / IDENTITY_FILE, "remove that folder or choose another --out")


PATHS = "paths"  # an identity's record of where its inputs were: kept for people to read, never compared


def check_identity(folder: str | Path, saved: dict, identity: dict, fix: str) -> None:
    """Refuse a folder recorded with another identity, naming (up to four of) the fields that differ. Inputs
    are identified by content; where they were (the PATHS entry) may change, so moved folders still resume."""
    differences = identity_differences({k: v for k, v in saved.items() if k != PATHS},
                                       {k: v for k, v in identity.items() if k != PATHS})
    if differences:
        raise ValueError(f"{folder} holds a different run ({'; '.join(differences[:4])}); {fix}")


def write_identity(folder: str | Path, identity: dict) -> None:
    atomic_write(Path(folder) / IDENTITY_FILE, json.dumps(identity, indent=2) + "\n")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(folder: str | Path, names: list[str]) -> str:
    """One SHA-256 for several files of a folder (each file's name and content hash, in the given order)."""
    lines = "".join(f"{name}:{file_sha256(Path(folder) / name)}\n" for name in names)
    return hashlib.sha256(lines.encode()).hexdigest()


def sampled_sha256(paths: list[Path], block: int = 1 << 20) -> str:
    """A cheap content fingerprint of large files (a base model's weights): each file's name, size and its
    first, middle and last `block` bytes. Re-initialised or retrained weights change it; hashing every byte
    of a multi-GB model at every evaluation would not be worth its time."""
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
                f.seek(offset)
                digest.update(f.read(block))
    return digest.hexdigest()


def write_progress(folder: str | Path, *, epoch: int, epochs: int, adapter_sha256: str | None,
                   stopped: str | None = None) -> None:
    """Record how far the training run behind the adapter in `folder` got: `epoch` of `epochs` done, the
    content hash of the adapter files that epoch produced, and why it stopped early (None: it did not)."""
    record = {"epoch": epoch, "epochs": epochs, "finished": epoch >= epochs and stopped is None,
              "adapter_sha256": adapter_sha256, "stopped": stopped}
    atomic_write(Path(folder) / PROGRESS_FILE, json.dumps(record, indent=2) + "\n")


def read_progress(folder: str | Path) -> dict | None:
    """The training progress recorded beside an adapter (None: the folder has no record, e.g. a PEFT
    adapter made elsewhere)."""
    return read_json_record(Path(folder) / PROGRESS_FILE, "resume the training run with --resume")
