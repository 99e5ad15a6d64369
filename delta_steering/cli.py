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
