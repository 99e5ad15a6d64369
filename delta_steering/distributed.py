"""Splitting a step's work across processes: torchrun ranks, gathered in memory for rank 0 to write
the outputs, or `--shard I/N` slices for schedulers without torchrun (SLURM job arrays), each written
to a shard file that `--merge` combines.

Work items are named, listed in a fixed order and dealt round-robin; every item is computed exactly
as a single process computes it, so the combined results equal a single-process run's.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .cli import UsageError
from .results_io import Checkpoint, differing_keys, read_json, write_json

SHARD_DIR = "shards"


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

    def checkpoint(self, args, step: str, fingerprint: dict) -> Checkpoint:
        return Checkpoint(self.checkpoint_file(args.output_dir, step), fingerprint, args.overwrite)

    def share(self, items: list) -> list:
        """This process's items: every world-th, starting at its rank."""
        return items[self.rank::self.world]

    def gather(self, results: dict) -> dict:
        """Under torchrun, all ranks' results merged (on every rank); otherwise this process's own."""
        if self.launcher != "torchrun":
            return results
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, results)
        return {key: value for part in parts for key, value in part.items()}

    def run(self, items: list, compute: Callable[[Any], dict], desc: str | None = None,
            checkpoint: Checkpoint | None = None) -> dict:
        """Compute this process's share of `items` (each gives a dict of named results), skipping those
        the checkpoint holds and saving it after each, then gather."""
        results: dict = {}
        for item in tqdm(self.share(items), desc=desc, unit="item", disable=desc is None or self.quiet):
            key = repr(item)
            if checkpoint is not None and key in checkpoint.done:
                results.update(checkpoint.done[key])
                continue
            done = compute(item)
            if checkpoint is not None:
                checkpoint.done[key] = done
                checkpoint.save()
            results.update(done)
        return self.gather(results)

    def barrier(self) -> None:
        if self.launcher == "torchrun":
            import torch.distributed as dist

            dist.barrier()


def add_distributed_args(parser) -> None:
    """--overwrite (for the per-process checkpoints), --shard and --merge."""
    parser.add_argument("--overwrite", action="store_true", help="discard a checkpoint from other arguments")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run slice I of N (0-based) and write a shard file instead of the results")
    parser.add_argument("--merge", nargs="*", default=None, metavar="SHARD",
                        help="combine shard files (default: all in OUTPUT_DIR/shards) into the results; "
                             "no model is loaded")


def parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or not 0 <= i < n:
        raise UsageError(f"malformed --shard {text!r}: use I/N with 0 <= I < N, e.g. 0/4")
    return i, n


def start_workers(args) -> Workers:
    """Join torchrun's process group (gloo on CPU, nccl on `cuda:LOCAL_RANK`) or take --shard's slice.

    Ranks other than 0 print nothing to stdout and show no progress bars."""
    if args.shard is not None and args.merge is not None:
        raise UsageError("--shard and --merge exclude each other: run the shards first, then --merge")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers(*parse_shard(args.shard), "shard") if args.shard is not None else Workers()
    if args.shard is not None or args.merge is not None:
        raise UsageError("--shard and --merge are for runs without torchrun; under torchrun the ranks share the work")
    import torch
    import torch.distributed as dist

    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(dist.destroy_process_group)
    workers = Workers(dist.get_rank(), world, "torchrun")
    if workers.quiet:
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")
    return workers


def finish(args, workers: Workers, step: str, fingerprint: dict, context: dict, results: dict,
           report: Callable[[], None]) -> None:
    """A shard writes its shard file, a single process or rank 0 reports; then every process drops its
    checkpoint (under torchrun once the results are written)."""
    if workers.launcher == "shard":
        print(f"shard: {write_shard(args.output_dir, step, workers, fingerprint, context, results)}")
    elif workers.writes_outputs:
        report()
    workers.barrier()
    workers.checkpoint_file(args.output_dir, step).unlink(missing_ok=True)


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
        if shard["fingerprint"] != fingerprint:
            differ = ", ".join(differing_keys(shard["fingerprint"], fingerprint))
            raise UsageError(f"shard {path} comes from a run with different arguments ({differ})")
    counts = {shard["shard"][1] for _, shard in shards}
    indices = sorted(shard["shard"][0] for _, shard in shards)
    if len(counts) > 1 or indices != list(range(counts.pop())):
        found = ", ".join("{}/{}".format(*shard["shard"]) for _, shard in shards)
        raise UsageError(f"shards {found} are not one complete set (each of 0/N .. N-1/N exactly once)")
    results = {key: value for _, shard in shards for key, value in shard["results"].items()}
    return shards[0][1]["context"], results
