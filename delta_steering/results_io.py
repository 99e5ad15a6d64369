"""Results on disk: atomic JSON and JSONL writes, reading with one-line errors, the resume checkpoint
and the `run` record of every result file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from .errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class WriteError(UsageError):
    """A result file could not be written (full disk, a folder that refuses files)."""


@contextmanager
def atomic_text(path: str | os.PathLike) -> Iterator[TextIO]:
    """A text file written to a temporary name beside `path` and renamed over it when complete, with
    the permissions an ordinary open() would give it: a reader never sees half a file. An OSError
    becomes a WriteError naming the file and the reason."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(f"could not write {path} ({e.strerror or e})") from None
        raise


def finite(data: Any) -> Any:
    """`data` with every non-finite float (NaN, inf: non-finite logits, undefined statistics) as None,
    so that no JSON file holds a bare NaN token, which strict JSON readers refuse."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def json_text(data: Any) -> str:
    """The text of a JSON result file: indented, non-finite numbers as null."""
    return json.dumps(finite(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (see atomic_text), non-finite numbers as null."""
    with atomic_text(path) as f:
        f.write(json_text(data))
    return Path(path)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write JSON lines atomically."""
    with atomic_text(path) as f:
        for row in rows:
            f.write(json.dumps(finite(row), ensure_ascii=False, allow_nan=False) + "\n")
    return Path(path)


def check_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path`, a file that exists; else a UsageError naming it as missing or as a directory."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    return path


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file, turning a missing or malformed file into a UsageError naming it."""
    path = check_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid JSON: {e}") from None


def parse_jsonl(lines: Iterable[str], where: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank JSON line; a bad line is a UsageError naming it."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where} line {number} is not valid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where} line {number} is not a JSON object")
        yield number, row


def read_jsonl_rows(path: str | os.PathLike, what: str = "file") -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file, with one-line errors
    naming file and line (a missing file, bad JSON, bytes that are not UTF-8)."""
    path = check_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return list(parse_jsonl(f, f"{what} {path}"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[dict]:
    """The objects of a JSON-lines file (see read_jsonl_rows)."""
    return [row for _, row in read_jsonl_rows(path, what)]


def warn(message: str) -> None:
    """One warning line with the run's output (stderr is kept for the one line of an error): the run
    goes on, the user should know."""
    print(f"warning: {message}")


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: tells a checkpoint or shard made from another version of an input file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def json_digest(data: Any) -> str:
    """SHA-256 of the file `write_json` writes for `data` (what `file_digest` gives once it is written)."""
    return hashlib.sha256(json_text(data).encode("utf-8")).hexdigest()


def differing_keys(saved: Any, current: dict) -> list[str]:
    """The keys whose values differ between a saved fingerprint and the current one."""
    saved = saved if isinstance(saved, dict) else {}
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def fingerprint_difference(saved: Any, current: dict, known_only: bool = False) -> str | None:
    """How a saved run fingerprint (the arguments, and under "inputs" the digest of each input by
    what it is: "task file F", "the model's weights") differs from this run's, in words: the first
    input whose digest changed, else the arguments that differ; None when they agree. With
    `known_only` the inputs this run lacks are not compared (a merge loads no model)."""
    saved = saved if isinstance(saved, dict) else {}
    ours = current.get("inputs") or {}
    theirs = saved.get("inputs") if isinstance(saved.get("inputs"), dict) else {}
    changed = [name for name in ours if name in theirs and theirs[name] != ours[name]]
    if changed:
        name = changed[0]
        return f"another version of {name} (SHA-256 {str(theirs[name])[:12]}... then, {str(ours[name])[:12]}... now)"
    differ = differing_keys({k: v for k, v in saved.items() if k != "inputs"},
                            {k: v for k, v in current.items() if k != "inputs"})
    other = sorted(set(ours) - set(theirs)) + ([] if known_only else sorted(set(theirs) - set(ours)))
    if differ or other:
        return "different " + " and ".join(part for part in (f"arguments ({', '.join(differ)})" * bool(differ),
                                                              f"inputs ({', '.join(other)})" * bool(other)) if part)
    return None


class Checkpoint:
    """The results of the work items done so far, saved after each, so that rerunning the same
    command resumes; a checkpoint written with other arguments or from other inputs (a task file
    edited since, other model weights) is refused (or discarded with `overwrite`)."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, overwrite: bool = False):
        self.path, self.fingerprint = Path(path), fingerprint
        self.done: dict[str, dict] = {}
        if self.path.is_file() and not overwrite:
            saved = read_json(self.path, "checkpoint")
            difference = fingerprint_difference(saved.get("fingerprint") if isinstance(saved, dict) else None,
                                                fingerprint)
            if difference is not None:
                raise UsageError(f"checkpoint {self.path} comes from a run with {difference}; pass --overwrite to "
                                 "discard it and start over")
            self.done = saved.get("done", {})

    def save(self) -> None:
        write_json(self.path, {"fingerprint": self.fingerprint, "done": self.done})


class RunLock:
    """A lock file held while a run uses an output folder (host, process id and the process's start
    time). A second run is refused with one line. A stale lock is taken over with a note: one that
    names no process or cannot be read (a crash while it was written), or names a process of this
    host that no longer exists, that started after the lock was written (its id reused), or this
    very process (an earlier run in the same interpreter). A lock a live process holds that is no
    step run (not Python) is refused with the hint that it can be deleted. A lock that cannot be
    written (a full disk) is one line and leaves nothing behind."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.owner = f"{platform.node()} {os.getpid()} {_started(os.getpid())}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            except OSError as e:
                raise WriteError(f"could not write {self.path} ({e.strerror or e})") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(self.owner)
            except OSError as e:
                self.path.unlink(missing_ok=True)
                raise WriteError(f"could not write the lock {self.path} ({e.strerror or e}); nothing was left "
                                 "behind, rerun once it can be written") from None
            return
        raise UsageError(f"could not take the lock {self.path}; another run is starting in the same folder")

    def _take_over_or_refuse(self) -> None:
        try:
            fields = self.path.read_text().split()
        except FileNotFoundError:  # released between our attempt and this read
            return
        except (OSError, UnicodeDecodeError) as e:
            return self._take_over(f"it cannot be read ({getattr(e, 'strerror', None) or e})")
        host, pid, started = (fields + ["", "", ""])[:3]
        if not host or not pid.isdigit():
            return self._take_over("it names no process")
        if host != platform.node():
            raise UsageError(f"{self.path.parent} is in use by another run (process {pid} on {host}; lock "
                             f"{self.path}); wait for it to finish or use another output folder (delete the lock "
                             "if that run is gone)")
        if int(pid) == os.getpid():
            self.path.unlink(missing_ok=True)
            return
        if not _alive(int(pid)):
            return self._take_over(f"process {pid} no longer exists")
        if started and started != _started(int(pid)):
            return self._take_over(f"process {pid} started after it was written")
        program = _program(int(pid))
        if program is not None and "python" not in program.lower():
            raise UsageError(f"{self.path.parent} is locked by process {pid} ({program}), which is no step run; if "
                             f"no run uses this folder, delete {self.path} and rerun")
        raise UsageError(f"{self.path.parent} is in use by another run (process {pid} on {host}; lock {self.path}); "
                         "wait for it to finish or use another output folder")

    def _take_over(self, reason: str) -> None:
        """Remove a stale lock, saying why; one line when it cannot be removed."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:
            raise UsageError(f"the lock {self.path} is stale ({reason}) but cannot be removed ({e.strerror or e}); "
                             "delete it and rerun") from None
        print(f"note: taking over the stale lock {self.path}: {reason}")

    def release(self) -> None:
        try:
            if self.path.read_text().strip() == self.owner:
                self.path.unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _started(pid: int) -> str:
    """When process `pid` started (seconds since the epoch, as the system reports it), "" if unknown."""
    import psutil

    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


def _program(pid: int) -> str | None:
    """The program process `pid` runs (its command's first word), None if it cannot be told."""
    import psutil

    try:
        command = psutil.Process(pid).cmdline()
        return Path(command[0]).name if command else psutil.Process(pid).name()
    except psutil.Error:
        return None


def package_versions(names=("torch", "transformers", "datasets", "lm_eval", "numpy", "scipy")) -> dict:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def command_line() -> str:
    """This process's command, as typed (the script's file name and its arguments)."""
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:])


def run_record(command: str, arguments: dict, model_info: dict | None, started: float, **extra) -> dict:
    """What a researcher needs to reproduce a run: command, arguments, versions, model, timing."""
    return {
        "command": command,
        "args": dict(arguments),
        "versions": package_versions(),
        "model": model_info,
        "platform": platform.platform(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 2),
        **extra,
    }
