"""Pile documents for delta statistics and perplexity.

From the Hub: monology/pile-uncopyrighted (streaming), then NeelNanda/pile-10k, then EleutherAI/pile.
Locally: .jsonl / .jsonl.zst with a "text" field, .txt (one document per block separated by blank
lines), .parquet, or a folder of such files. The same seed gives the same documents.

Two roles never share a document: "statistics" (step 1's delta statistics, which pick the
high-variance set) takes the even positions of the seed's shuffled pool, "evaluation" (perplexity in
steps 2 and 3) the odd ones.
"""

from __future__ import annotations

import hashlib
import io
import random
import sys
from pathlib import Path

from ..errors import UsageError
from ..results_io import parse_jsonl, warn

HUB_SOURCES = (
    ("monology/pile-uncopyrighted", {"streaming": True}),
    ("NeelNanda/pile-10k", {}),
    ("EleutherAI/pile", {"streaming": True}),
)
LOCAL_SUFFIXES = (".jsonl", ".jsonl.zst", ".txt", ".parquet")
SHUFFLE_BUFFER = 10_000
ROLES = {"statistics": 0, "evaluation": 1}  # offset into the shuffled pool, taken every second document


def _jsonl_texts(lines, path: Path) -> list[str]:
    texts = []
    for number, row in parse_jsonl(lines, f"Pile file {path}"):
        if not isinstance(row.get("text"), str):
            raise UsageError(f"Pile file {path} line {number}: expected a JSON object with a \"text\" field")
        texts.append(row["text"])
    return texts


def read_local_file(path: Path) -> list[str]:
    """Documents of one local file, by its suffix."""
    name = path.name.lower()
    try:
        if name.endswith(".jsonl.zst"):
            import zstandard

            with open(path, "rb") as f:
                return _jsonl_texts(io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"),
                                    path)
        if name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                return _jsonl_texts(f, path)
        if name.endswith(".txt"):
            blocks = path.read_text(encoding="utf-8").split("\n\n")
            return [b.strip("\n") for b in blocks if b.strip()]
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot read Pile file {path}: {type(e).__name__}: {e}") from None
    raise UsageError(f"unsupported Pile file {path}: use {', '.join(LOCAL_SUFFIXES)} or a folder of them")


def local_files(path: str | Path) -> list[Path]:
    """The supported files of a local Pile file or folder (sorted by name); a UsageError if none."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(LOCAL_SUFFIXES))
        if not files:
            raise UsageError(f"no Pile files ({', '.join(LOCAL_SUFFIXES)}) in folder {path}")
        return files
    if not path.is_file():
        raise UsageError(f"Pile path not found: {path}")
    return [path]


def read_local(path: str | Path) -> list[str]:
    """Documents of a local file or of every supported file in a folder (sorted by name)."""
    return [text for f in local_files(path) for text in read_local_file(f)]


def _load_hub(num_samples: int, seed: int, split: str) -> list[str]:
    """First Hub source that answers; each failure is logged in one line."""
    from datasets import load_dataset

    for name, kwargs in HUB_SOURCES:
        try:
            source_split = "train" if name == "NeelNanda/pile-10k" else split
            dataset = load_dataset(name, split=source_split, **kwargs)
            if kwargs.get("streaming"):
                dataset = dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
                return [row["text"] for row, _ in zip(dataset, range(num_samples))]
            return list(dataset.shuffle(seed=seed).select(range(min(num_samples, len(dataset))))["text"])
        except Exception as e:
            print(f"pile: {name} unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
                  file=sys.stderr)
    raise UsageError("no Pile source on the Hub could be reached; pass --pile_path with local "
                     ".jsonl/.jsonl.zst/.txt/.parquet files")


def load_pile_texts(num_samples: int, seed: int = 0, path: str | Path | None = None,
                    split: str = "validation", role: str | None = None) -> list[str]:
    """`num_samples` non-empty Pile documents, the same ones for the same seed.

    The pool (a local file or folder, or the Hub stream) is shuffled with `seed`; without a role the
    first `num_samples` documents are taken (all of them if fewer), with a role every second one
    from its offset, so that "statistics" and "evaluation" documents are disjoint."""
    if num_samples < 1:
        raise UsageError(f"--pile_samples must be at least 1, got {num_samples}")
    if role is not None and role not in ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    stride = 1 if role is None else 2
    if path is None:
        texts = _load_hub(num_samples * stride, seed, split)
    else:
        texts = read_local(path)
        random.Random(seed).shuffle(texts)
    pool = [t for t in texts if t and t.strip()]
    texts = pool[ROLES.get(role, 0)::stride][:num_samples]
    if not texts:
        raise UsageError(f"no non-empty documents{f' for {role}' if role else ''} in {path or 'the Pile source'}"
                         + (f" ({len(pool)} in all; {role} takes every second one from position {ROLES[role]})"
                            if role else ""))
    if len(texts) < num_samples:
        warn(f"{path or 'the Pile source'} gives {len(texts)} {role or ''} documents; using {len(texts)}, not "
             f"{num_samples}".replace("  ", " "))
    return texts


def document_digests(texts: list[str]) -> list[str]:
    """A short SHA-256 of each document: records which documents a result used without storing them."""
    return [hashlib.sha256(t.encode("utf-8")).hexdigest()[:16] for t in texts]


def pile_record(texts: list[str], role: str) -> dict:
    """What a result JSON says of the Pile documents it used: their role, count and digests."""
    return {"role": role, "count": len(texts), "digests": document_digests(texts)}
