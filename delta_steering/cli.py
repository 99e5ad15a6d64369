"""What the scripts share at the command line: argument groups with help and defaults, one-line
errors with exit status 2, parsing of id and number lists, and checks of output paths before any
work. Imports nothing heavy, so `--help` and argument errors answer at once."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable

from .artifacts import STEP1_DEFAULTS
from .errors import UsageError
from .intervention import Intervention, Steering, check_factor
from .options import ENGINES, DiscoverOptions, Options, PileOptions, SweepOptions


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and an option's default after its help when it has one (an
    option without one says in its help what happens when it is not given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def step_parser(description: str) -> argparse.ArgumentParser:
    """A script's parser. No abbreviations: `--factors 5` must not silently mean `--factors_file 5`."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)


def main_guard(main: Callable[[], int | None]) -> Callable[[], None]:
    """Run a script's main: a UsageError exits 2 with one line on stderr, Ctrl-C exits 130 saying
    that the run resumes; anything else is a bug and keeps its traceback."""

    @functools.wraps(main)
    def wrapped() -> None:
        try:
            code = main()
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: progress so far is checkpointed; run the same command to resume",
                  file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapped


def parse_int_list(text: str | None, what: str = "neurons") -> list[int] | None:
    """Parse '0-127', '3,5,9-12' into a sorted list of distinct ints; None stays None."""
    if text is None:
        return None
    ids: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            lo, hi = int(lo), int(hi) if sep else int(lo)
            if hi < lo:
                raise ValueError
            ids.extend(range(lo, hi + 1))
        except ValueError:
            raise UsageError(f"malformed --{what} {text!r}: use ids and ranges like 0-127 or 3,5,9-12") from None
    if not ids:
        raise UsageError(f"--{what} {text!r} names no ids")
    if len(set(ids)) < len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise UsageError(f"--{what} {text!r} names {twice[0]} more than once")
    return sorted(ids)


def parse_factors(text: str, what: str = "factors") -> list[float]:
    """Comma-separated steering factors, each checked (finite, > 0)."""
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"malformed --{what} {text!r}: use comma-separated numbers like 0.5,2,10") from None
    if not values:
        raise UsageError(f"--{what} is empty")
    return [check_factor(v, f"--{what}") for v in values]


def parse_steer(text: str) -> Steering:
    """--steer LAYER:NEURONS:FACTOR (e.g. 20:4,38,100-110:5; factor 0 is zero ablation) as a Steering."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        layer, factor = int(parts[0]), float(parts[2])
    except ValueError:
        raise UsageError(f"malformed --steer {text!r}: use LAYER:NEURONS:FACTOR, e.g. 20:4,38,100-110:5") from None
    neurons = parse_int_list(parts[1], "steer")
    return Steering(layer, Intervention.scale(neurons, check_factor(factor, f"--steer {text}", ablation=True)))


def check_device(device: str) -> str:
    """cpu, cuda, cuda:N or auto (mps where PyTorch has it): anything else is refused before the model loads."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps", "auto") or index and not (kind == "cuda" and index.isdigit()):
        raise UsageError(f"unknown --device {device!r}: use cpu, cuda, cuda:N or auto")
    return device


SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '40KB', '1.5GiB' or '1000' (KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: of 1024)."""
    number = text.rstrip("BbIiKkMmGgTt")
    unit = text[len(number):].upper() or "B"
    try:
        value = float(number) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size like 40KB or 70GiB") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a size like 40KB or 70GiB")
    return int(value)


def parse_max_memory(text: str) -> dict[int | str, int]:
    """--max_memory '0=70GiB,cpu=100GiB' as accelerate's max_memory: GPU index (0, or cuda:0) or
    "cpu" -> bytes."""
    budget: dict[int | str, int] = {}
    for entry in (e.strip() for e in str(text).split(",")):
        if not entry:
            continue
        device, sep, size = (part.strip() for part in entry.partition("="))
        device = device.removeprefix("cuda:")
        if not sep or not (device == "cpu" or device.isdigit()):
            raise UsageError(f"malformed --max_memory entry {entry!r}: use DEVICE=SIZE, DEVICE a GPU index (0, cuda:0) "
                             "or cpu, e.g. 0=70GiB,cpu=100GiB; disk is --offload_folder")
        key = int(device) if device.isdigit() else device
        if key in budget:
            raise UsageError(f"--max_memory names {device} twice")
        try:
            budget[key] = parse_size(size)
        except ValueError as e:
            raise UsageError(f"--max_memory {entry!r}: {e}") from None
    if not budget:
        raise UsageError(f"--max_memory {text!r} names no device")
    return budget


def max_memory_arg(text: str) -> str:
    """argparse's type for --max_memory: the text, once it parses (so that a run records it as given)."""
    try:
        parse_max_memory(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def check_output_dir(path: str | os.PathLike, flag: str, keep: bool = True) -> list[Path]:
    """A folder the run can write to, checked before any work by creating it (if absent) and a file
    in it: permissions, read-only or pseudo file systems all answer here, not after the work.
    Returns the folders it created, outermost first (`remove_empty` takes them back); with `keep`
    False they are removed again at once (the run creates its folder when it writes)."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    created = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        remove_empty(created)
        raise UsageError(f"{flag} {path} is not writable ({e.strerror or e})") from None
    if not keep:
        remove_empty(created)
        return []
    return created


def check_output_file(path: str | os.PathLike, flag: str) -> list[Path]:
    """A file the run can write (its folder created if absent), checked before any work; the
    folders created."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    return check_output_dir(path.parent, flag)


def remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (outermost first) that are empty, innermost first: what a refused
    run created and left unused."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            pass


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """--model and --tokenizer: where the model comes from."""
    parser.add_argument("--model", default="state-spaces/mamba-130m-hf", help="Hub id or local checkpoint directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: the model's)")


def add_steering_args(parser: argparse.ArgumentParser) -> None:
    """--steer (repeatable) and --from_step2: the steering that evaluate_steered.py and the export apply."""
    parser.add_argument("--steer", action="append", default=[], metavar="LAYER:NEURONS:FACTOR",
                        help="steer NEURONS (ids and ranges, e.g. 4,38,100-110) of LAYER by FACTOR (> 0; 0 is "
                             "ablation); repeatable, all applied together")
    parser.add_argument("--from_step2", default=None, metavar="FILE",
                        help="steer step 2's High Impact neurons at its layer by its High Impact factor")


def add_placement_args(parser: argparse.ArgumentParser, device: str = "cuda") -> None:
    """--device, --max_memory and --offload_folder: where the model's weights go and where it computes."""
    parser.add_argument("--device", default=device,
                        help="cuda, cuda:N or cpu (CPU with a warning if CUDA is absent), or auto: the model spread by "
                             "accelerate's device map over the GPUs, the CPU and disk (see --max_memory, "
                             "--offload_folder)")
    parser.add_argument("--max_memory", type=max_memory_arg, default=None, metavar="DEVICE=SIZE,...",
                        help="with --device auto, the memory each device may hold, e.g. 0=70GiB,cpu=100GiB (GPUs by "
                             "index; KB, MB, GB are powers of 1000, KiB, MiB, GiB of 1024); a device not listed holds "
                             "nothing (default: 90%% of what each device has free)")
    parser.add_argument("--offload_folder", default=None, metavar="DIR",
                        help="with --device auto, the layers that fit in no device's memory stay on disk and are read "
                             "at each forward (from the checkpoint's safetensors files where they can be, else "
                             "written to DIR); without it a model that does not fit is refused before loading")


def add_model_args(parser: argparse.ArgumentParser, batch_size: int | None = Options.batch_size,
                   device: str = "cuda") -> None:
    """--model/--tokenizer/--device/--max_memory/--offload_folder/--dtype/--batch_size/--seed, shared by
    every step."""
    add_source_args(parser)
    add_placement_args(parser, device)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weight dtype; half precision can overflow at large factors (reported, not scored)")
    fit = " (default: as many as fit in memory)" if batch_size is None else ""
    parser.add_argument("--batch_size", type=int, default=batch_size,
                        help=f"sequences per forward pass{fit}; results do not depend on it")
    parser.add_argument("--seed", type=int, default=Options.seed,
                        help="seeds Pile sampling, random sets and bootstrap CIs")


def add_discovery_args(parser: argparse.ArgumentParser, defaults: type[Options], saved: str, output_dir: str,
                       outputs: str) -> None:
    """--save_path, --validation_size, --output_dir, --tasks, --data_dir and --ablation: what step 1
    and the atlas ablate neurons on, and where their results go (`defaults`: the step's options)."""
    parser.add_argument("--save_path", required=True, help=f"where the {saved} JSON goes")
    parser.add_argument("--validation_size", type=int, default=defaults.validation_size,
                        help="discovery examples per task (the first half of each task's fixed-seed shuffle)")
    parser.add_argument("--output_dir", default=output_dir, help=f"{outputs} and the resume checkpoint")
    parser.add_argument("--tasks", default=",".join(defaults.tasks),
                        help="built-in task names or .jsonl files, comma-separated")
    parser.add_argument("--data_dir", default=None, help="local task data: DIR/<task>/<split>.jsonl (default: the Hub)")
    parser.add_argument("--ablation", default=DiscoverOptions.ablation, choices=["zero", "mean"],
                        help="zero: dt_pre set to 0 (factor 0); mean: set to its mean over the statistics documents")


def check_run_args(args: argparse.Namespace) -> list[Path]:
    """What every step's script checks before any work: the device, and that the files and folders
    it writes (those of --save_path, --save_step1, --output_dir, --out it has) can be written.
    Returns the folders created for them, for a refused run to remove (`remove_empty`)."""
    if hasattr(args, "device"):
        check_device(args.device)
    created = []
    for flag in ("save_path", "save_step1"):
        if getattr(args, flag, None) is not None:
            created += check_output_file(getattr(args, flag), f"--{flag}")
    if getattr(args, "output_dir", None) is not None:
        created += check_output_dir(args.output_dir, "--output_dir")
    if getattr(args, "out", None) is not None:  # the export's new checkpoint: made only once it is written
        check_output_dir(args.out, "--out", keep=False)
    return created


def add_step1_file_args(parser: argparse.ArgumentParser, files: str) -> None:
    """--neurons_file, --allow_model_mismatch, --layer and --transfer_layer: the step-1 file steps 2
    and 3 steer from, and where (`files`: what --allow_model_mismatch lets through)."""
    parser.add_argument("--neurons_file", default=None,
                        help=f"step-1 JSON (default: {' or else '.join(STEP1_DEFAULTS)})")
    parser.add_argument("--allow_model_mismatch", action="store_true", help=f"use {files} made with another model")
    parser.add_argument("--layer", type=int, default=None, help="default: the step-1 file's layer")
    parser.add_argument("--transfer_layer", action="store_true",
                        help="steer the step-1 neurons at a --layer other than the one they were found at "
                             "(recorded in the results)")


def add_pile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pile_samples", type=int, default=PileOptions.pile_samples, help="Pile documents")
    parser.add_argument("--pile_path", default=None,
                        help="local Pile file or folder (.jsonl, .jsonl.zst, .txt, .parquet; default: the Hub)")


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    """--engine and --chunk_neurons, for the single-neuron sweeps of steps 1 and 2."""
    parser.add_argument("--engine", default=SweepOptions.engine, choices=list(ENGINES),
                        help="fast: exact, from a shared prefix and a rank-1 correction per neuron; naive: the whole "
                             "model per neuron (the reference); both give the same results")
    parser.add_argument("--chunk_neurons", type=int, default=SweepOptions.chunk_neurons,
                        help="neurons per unit of work: progress is checkpointed, and shared between processes, "
                             "a chunk at a time")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--overwrite (the per-process checkpoints), --shard, --merge and --no_plots."""
    parser.add_argument("--overwrite", action="store_true", help="discard a checkpoint made with other arguments")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run slice I of N (0-based) and write a shard file instead of the results")
    parser.add_argument("--merge", nargs="*", default=None, metavar="SHARD",
                        help="combine shard files (none named: all in OUTPUT_DIR/shards) into the results; "
                             "no model is loaded")
    parser.add_argument("--no_plots", action="store_true", help="write no figures")


# how the command line writes an option that is a list (the steps take Python lists)
LIST_OPTIONS: dict[str, Callable] = {
    "tasks": parse_names, "neurons": parse_int_list, "factors": parse_factors,
    "layers": lambda text: parse_int_list(text, "layers"),
    "perplexity_layers": lambda text: parse_int_list(text, "perplexity_layers"),
    "steer": lambda texts: [parse_steer(text) for text in texts],
}


def options_of(cls: type[Options], args: argparse.Namespace, **values) -> Options:
    """A step's options from its parsed command line: every field of `cls` the script has (lists
    parsed from their command-line form), then `values`; checked."""
    for f in fields(cls):
        if f.name in values or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        values[f.name] = LIST_OPTIONS[f.name](value) if f.name in LIST_OPTIONS and value is not None else value
    return cls.of(values)
