"""What the three scripts share at the command line: clear one-line errors with exit status 2,
device choice with a warning on CPU, and parsing of neuron and number lists."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UsageError(Exception):
    """Bad input from the user: printed as one line on stderr, exit status 2, no traceback."""


def main_guard(main: Callable[[], int | None]) -> Callable[[], None]:
    """Run a script's main; UsageError (and ValueError from argument checks) exit 2 with one line."""

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
    """Parse '0-127', '3,5,9-12' or '' into a sorted list of distinct ints; None stays None."""
    if text is None:
        return None
    ids: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            lo, hi = int(lo), int(hi) if sep else int(lo)
            if hi < lo:
                raise ValueError
            ids.update(range(lo, hi + 1))
        except ValueError:
            raise UsageError(f"malformed --{what} {text!r}: use ids and ranges like 0-127 or 3,5,9-12") from None
    if not ids:
        raise UsageError(f"--{what} {text!r} names no ids")
    return sorted(ids)


def parse_float_list(text: str, what: str = "factors") -> list[float]:
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"malformed --{what} {text!r}: use comma-separated numbers like 0.5,2,10") from None
    if not values:
        raise UsageError(f"--{what} is empty")
    return values


def pick_device(requested: str) -> str:
    """The requested device, or CPU with one warning line when CUDA is asked for but absent."""
    import torch

    if requested.startswith("cuda") and not torch.cuda.is_available():
        print("warning: CUDA is not available, running on CPU (slow)", file=sys.stderr)
        return "cpu"
    return requested


def add_model_args(parser, device: str = "cuda") -> None:
    """--model/--device/--dtype/--batch_size/--seed, shared by the three steps."""
    parser.add_argument("--model", default="state-spaces/mamba-130m-hf", help="Hub id or local checkpoint directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: the model's)")
    parser.add_argument("--device", default=device, help="cuda, cuda:N or cpu (CPU with a warning if CUDA is absent)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch_size", type=int, default=None, help="sequences per forward pass (default: fit memory)")
    parser.add_argument("--seed", type=int, default=0, help="seeds Pile sampling, random sets and bootstrap CIs")


def add_pile_args(parser, samples: int = 100) -> None:
    parser.add_argument("--pile_samples", type=int, default=samples, help="Pile documents")
    parser.add_argument("--pile_path", default=None, help="local Pile file or folder (.jsonl, .jsonl.zst, .txt, .parquet)")


def add_sweep_args(parser) -> None:
    """--engine and --chunk_neurons, for the single-neuron sweeps of steps 1 and 2."""
    from .sweep import ENGINES

    parser.add_argument("--engine", default="fast", choices=list(ENGINES))
    parser.add_argument("--chunk_neurons", type=int, default=64,
                        help="neurons per unit of work: progress is checkpointed, and shared between processes, "
                             "a chunk at a time")


def check_positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be at least 1, got {value}")


def load_model(args):
    """Model and tokenizer from the common arguments, after checking batch size."""
    from mamba_model_loader import load_mamba_model

    check_positive(args.batch_size, "--batch_size")
    return load_mamba_model(args.model, args.device, args.dtype, tokenizer=args.tokenizer)


def check_layer(model, layer: int, flag: str = "--layer") -> int:
    from .steering import num_layers

    n = num_layers(model)
    if not 0 <= layer < n:
        raise UsageError(f"{flag} {layer} out of range: the model has layers 0-{n - 1}")
    return layer


def check_neuron_ids(model, neurons: list[int], what: str = "--neurons") -> list[int]:
    from .steering import num_delta_neurons

    n = num_delta_neurons(model)
    bad = [i for i in neurons if not 0 <= i < n]
    if bad:
        raise UsageError(f"{what}: neuron {bad[0]} out of range, the model has delta neurons 0-{n - 1}")
    return neurons
