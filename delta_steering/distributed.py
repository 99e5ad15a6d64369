"""How a process takes part in a step: alone, as a torchrun rank, as a `--shard I/N` slice (for
schedulers without torchrun, e.g. SLURM job arrays), or merging shard files with `--merge`; and
resuming after an interruption from its own checkpoint.

A step's work is a dict of named items (`name -> compute`, each giving a dict of named results),
listed in a fixed order and dealt round-robin; every item is computed exactly as a single process
computes it, so the combined results equal a single-process run's. Under torchrun the ranks gather
their results for rank 0 to report; a shard writes its results to a shard file instead.
"""

from __future__ import annotations

import atexit
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from .errors import UsageError
from .progress import tqdm
from .results_io import Checkpoint, RunLock, WriteError, fingerprint_difference, read_json, write_json

SHARD_DIR = "shards"
# arguments that change neither what a step measures nor how it is split into items (the model
# is there by its weights' fingerprint, among the inputs, not by its path)
NOT_MEASURED = ("model", "device", "max_memory", "offload_folder", "batch_size", "engine", "chunk_neurons",
                "output_dir", "save_path", "no_plots", "overwrite", "shard", "merge", "threshold", "ifeval_metric",
                "score_responses")


def fingerprint(arguments: dict, inputs: dict[str, str]) -> dict:
    """What must agree for a checkpoint to be resumed or shards to be merged: the arguments (less
    NOT_MEASURED) and the digest of every input by what it is (`inputs`: "task file F" -> SHA-256,
    "the model's weights" -> its fingerprint)."""
    return {**{k: v for k, v in arguments.items() if k not in NOT_MEASURED}, "inputs": dict(inputs)}


@dataclass(frozen=True)
class Workers:
    """This process's place in the run: rank `rank` of `world`, launched by `launcher`."""

    rank: int = 0
    world: int = 1
    launcher: str = "single"  # "single", "torchrun" or "shard"

    @property
    def writes_outputs(self) -> bool:
        """A single process or torchrun's rank 0 writes the JSON and plots; a shard writes its shard file."""
        return self.rank == 0 and self.launcher != "shard"

    @property
    def quiet(self) -> bool:
        """torchrun's ranks other than 0 show no progress and print nothing to stdout."""
        return self.launcher == "torchrun" and self.rank > 0

    def checkpoint_file(self, output_dir: str | os.PathLike, step: str) -> Path:
        """This process's checkpoint: `step1_checkpoint.json`, or `step1_checkpoint.1of4.json` for rank 1 of 4."""
        suffix = "" if self.world == 1 else f".{self.rank}of{self.world}"
        return Path(output_dir) / f"{step}_checkpoint{suffix}.json"

    def share(self, items: list) -> list:
        """This process's items: every world-th, starting at its rank."""
        return items[self.rank::self.world]

    def gather(self, results: dict) -> dict:
        """Under torchrun, all ranks' results merged (on every rank); otherwise this process's own."""
        if self.launcher != "torchrun":
            return results
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, results)
        return {key: value for part in parts for key, value in part.items()}

    def barrier(self) -> None:
        if self.launcher == "torchrun":
            dist.barrier()


def parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or not 0 <= i < n:
        raise UsageError(f"malformed --shard {text!r}: use I/N with 0 <= I < N, e.g. 0/4")
    return i, n


def start_workers(shard: str | None, merge: list[str] | None, device: str) -> tuple[Workers, str]:
    """Join torchrun's process group (gloo on CPU, nccl on `cuda:LOCAL_RANK`) or take --shard's slice;
    this process's place and the device it computes on (each rank its own GPU).

    Ranks other than 0 print nothing to stdout and show no progress bars."""
    if shard is not None and merge is not None:
        raise UsageError("--shard and --merge exclude each other: run the shards first, then --merge")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return (Workers(*parse_shard(shard), "shard") if shard is not None else Workers()), device
    if shard is not None or merge is not None:
        raise UsageError("--shard and --merge are for runs without torchrun; under torchrun the ranks share the work")
    if device == "auto" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise UsageError("--device auto spreads one model over this machine's devices; under torchrun with several "
                         "processes a machine, give each its own GPU (--device cuda) or run one process a machine")
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(dist.destroy_process_group)
    workers = Workers(dist.get_rank(), world, "torchrun")
    if workers.quiet:
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")
    return workers, device


def shard_path(output_dir: str | os.PathLike, step: str, workers: Workers) -> Path:
    return Path(output_dir) / SHARD_DIR / f"{step}.shard{workers.rank}of{workers.world}.json"


def write_shard(output_dir, step: str, workers: Workers, fingerprint: dict, context: dict, results: dict) -> Path:
    """One slice's results with what every slice shares (`context`) and the arguments that made them."""
    return write_json(shard_path(output_dir, step, workers),
                      {"step": step, "shard": [workers.rank, workers.world], "fingerprint": fingerprint,
                       "context": context, "results": results})


def _is_slice(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)


def read_shards(paths: list[str], output_dir, step: str, fingerprint: dict) -> tuple[dict, dict]:
    """The context and the combined results of a complete set of shards made with these arguments."""
    files = [Path(p) for p in paths] or sorted((Path(output_dir) / SHARD_DIR).glob(f"{step}.shard*of*.json"))
    if not files:
        raise UsageError(f"no {step} shard files in {Path(output_dir) / SHARD_DIR}; run with --shard I/N first "
                         "or name the files after --merge")
    shards = [(path, read_json(path, "shard file")) for path in files]
    for path, shard in shards:
        if not isinstance(shard, dict) or shard.get("step") != step or not _is_slice(shard.get("shard")) or \
                not all(k in shard for k in ("fingerprint", "context", "results")):
            raise UsageError(f"{path} is not a {step} shard file")
        # this run's inputs (the model's weights are not known to a merge), and each other's in full
        difference = fingerprint_difference(shard["fingerprint"], fingerprint, known_only=True) or \
            fingerprint_difference(shard["fingerprint"], shards[0][1]["fingerprint"])
        if difference is not None:
            raise UsageError(f"shard {path} comes from a run with {difference}")
    counts = {shard["shard"][1] for _, shard in shards}
    indices = sorted(shard["shard"][0] for _, shard in shards)
    if len(counts) > 1 or indices != list(range(counts.pop())):
        found = ", ".join("{}/{}".format(*shard["shard"]) for _, shard in shards)
        raise UsageError(f"shards {found} are not one complete set (each of 0/N .. N-1/N exactly once)")
    results = {key: value for _, shard in shards for key, value in shard["results"].items()}
    return shards[0][1]["context"], results


class StepRun:
    """One step as this process runs it: `map` computes its share of the named work items (resuming
    from its checkpoint in `output_dir`, if any), `merged` reads a complete set of shards instead,
    `publish` says whether this process writes the results (a shard writes its shard file), `close`
    drops the checkpoint. Without `output_dir` nothing is kept on disk (a run from the library)."""

    def __init__(self, step: str, fingerprint: dict, output_dir: str | os.PathLike | None = None, *,
                 overwrite: bool = False, shard: str | None = None, merge: list[str] | None = None,
                 device: str = "cpu"):
        self.step, self.fingerprint, self.output_dir, self.merge = step, fingerprint, output_dir, merge
        self.workers, self.device = start_workers(shard, merge, device)
        self.merging = merge is not None
        self.lock = self.checkpoint = None
        if output_dir is None:
            return
        checkpoint_file = self.workers.checkpoint_file(output_dir, step)
        self.lock = RunLock(Path(output_dir) / f"{step}.merge.lock" if self.merging
                            else checkpoint_file.with_name(checkpoint_file.name + ".lock"))
        atexit.register(self.lock.release)
        self.checkpoint = None if self.merging else Checkpoint(checkpoint_file, fingerprint, overwrite)

    def merged(self) -> tuple[dict, dict]:
        return read_shards(self.merge, self.output_dir, self.step, self.fingerprint)

    def map(self, work: dict[str, Callable[[], Any]], desc: str, unit: str = "item", shared: bool = True) -> dict:
        """Compute this process's share of `work` (name -> compute), skipping the items its checkpoint
        holds and saving after each, then gather every process's results (name -> result). With
        `shared=False` every process computes every item (what a later item needs and a slice may lack)."""
        mine = self.workers.share(list(work)) if shared else list(work)
        done = self.checkpoint.done if self.checkpoint is not None else {}
        results = {name: done[name] for name in mine if name in done}
        if results and not self.workers.quiet:
            print(f"resuming: {len(results)} of {len(mine)} {unit}s done ({self.checkpoint.path})")
        for name in tqdm([n for n in mine if n not in results], desc=desc, unit=unit, disable=self.workers.quiet):
            results[name] = work[name]()
            if self.checkpoint is not None:
                self.checkpoint.done[name] = results[name]
                try:
                    self.checkpoint.save()
                except WriteError as e:  # a full disk: what was saved before stays whole
                    raise UsageError(f"{e}; the {unit}s saved before are kept, rerun the same command once it can "
                                     "be written to resume") from None
        return self.workers.gather(results)

    def publish(self, context: dict, results: dict) -> bool:
        """True where this process writes the step's outputs; a shard writes its shard file instead."""
        if self.workers.launcher == "shard":
            path = write_shard(self.output_dir, self.step, self.workers, self.fingerprint, context, results)
            print(f"shard: {path}")
        return self.merging or self.workers.writes_outputs

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Around writing the outputs: a file that cannot be written is one line saying where the
        work is kept, so that rerunning the same command finishes the job without redoing it."""
        try:
            yield
        except WriteError as e:
            kept = "the shard files" if self.merging else self.checkpoint.path
            raise UsageError(f"{e}; the work is kept in {kept}, rerun the same command to finish") from None

    def close(self) -> None:
        """Once the outputs are written: every process drops its checkpoint (under torchrun together)
        and its lock."""
        self.workers.barrier()
        if self.checkpoint is not None:
            self.checkpoint.path.unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.release()
