"""Results on disk: atomic JSON and JSONL writes, reading with one-line errors, the resume checkpoint
and the `run` record of every result file."""

from __future__ import annotations

import hashlib
import json
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


@contextmanager
def atomic_text(path: str | os.PathLike) -> Iterator[TextIO]:
    """A text file written to a temporary name beside `path` and renamed over it when complete, with
    the permissions an ordinary open() would give it: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (see atomic_text)."""
    with atomic_text(path) as f:
        json.dump(data, f, indent=2, ensure_ascii=False, allow_nan=True)
        f.write("\n")
    return Path(path)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write JSON lines atomically."""
    with atomic_text(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file, turning a missing or malformed file into a UsageError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
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


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[dict]:
    """Read a JSON-lines file (blank lines skipped) with one-line errors naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [row for _, row in parse_jsonl(f, f"{what} {path}")]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: tells a checkpoint or shard made from another version of an input file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def differing_keys(saved: Any, current: dict) -> list[str]:
    """The keys whose values differ between a saved fingerprint and the current one."""
    saved = saved if isinstance(saved, dict) else {}
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


class Checkpoint:
    """The results of the work items done so far, saved after each, so that rerunning the same
    command resumes; a checkpoint written with other arguments is refused (or discarded with
    `overwrite`)."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, overwrite: bool = False):
        self.path, self.fingerprint = Path(path), fingerprint
        self.done: dict[str, dict] = {}
        if self.path.is_file() and not overwrite:
            saved = read_json(self.path, "checkpoint")
            if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
                differ = differing_keys(saved.get("fingerprint") if isinstance(saved, dict) else None, fingerprint)
                raise UsageError(f"checkpoint {self.path} comes from a run with different arguments "
                                 f"({', '.join(differ)}); pass --overwrite to discard it")
            self.done = saved.get("done", {})

    def save(self) -> None:
        write_json(self.path, {"fingerprint": self.fingerprint, "done": self.done})


def package_versions(names=("torch", "transformers", "datasets", "lm_eval", "numpy", "scipy")) -> dict:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_record(args, model_info: dict | None, started: float, **extra) -> dict:
    """What a researcher needs to reproduce a run: command, arguments, versions, model, timing."""
    return {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "args": dict(vars(args)),
        "versions": package_versions(),
        "model": model_info,
        "platform": platform.platform(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 2),
        **extra,
    }
