"""How a group of requests that share a context is read: the context once and each continuation from
its cached state (`continuation`), or every request whole. Both give the same numbers up to float
rounding (about 1e-6 relative); which is faster depends on the family and the requests' shape. On
CPU, Mamba-1 reads the six tasks' shared contexts faster once, while Mamba-2's chunked scan pads
every forward to its chunk size, so the second forward for the continuations can cost more than the
context it saves (`benchmarks/bench_scoring.py --family mamba2 --contexts shared|whole`).

So the choice is measured, not assumed: the first time a use of a model meets a shape, it reads
those groups both ways, keeps the faster way for every later group of that shape (in this process),
and returns that way's numbers. A rerun on a machine under different load may choose differently;
its numbers then differ at the level of float rounding, as they do between batch sizes.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable, TypeVar

import torch

from ..model.placement import devices
from .batching import Encoded

GroupShape = tuple[int, int, int]
Result = TypeVar("Result")

_CHOICES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, ReadingChoice]]" = weakref.WeakKeyDictionary()


def length_class(tokens: int) -> int:
    """Lengths within a factor of four share a class (0; 1-3; 4-15; 16-63; ...)."""
    return (tokens.bit_length() + 1) // 2


def group_shape(encoded: list[Encoded], group: list[int]) -> GroupShape:
    """A context group's shape: its requests, and the length classes of its context and of its
    longest continuation after the context (the tokens read from the cached state)."""
    tail = max(encoded[i].n_target - 1 for i in group)
    return len(group), length_class(encoded[group[0]].context_length), length_class(tail)


class ReadingChoice:
    """For each shape met so far, whether reading its contexts once was measured the faster way."""

    def __init__(self, devices: list[torch.device]):
        self.gpus = [d for d in devices if d.type == "cuda"]
        self.shared: dict[GroupShape, bool] = {}

    def synchronize(self) -> None:
        for gpu in self.gpus:
            torch.cuda.synchronize(gpu)

    def seconds(self, read: Callable[[], Result]) -> tuple[Result, float]:
        """read's result and wall-clock seconds (synchronised on every GPU the model computes on)."""
        self.synchronize()
        start = time.perf_counter()
        result = read()
        self.synchronize()
        return result, time.perf_counter() - start

    def race(self, shape: GroupShape, shared: Callable[[], Result], whole: Callable[[], Result]) -> Result:
        """Read the same groups both ways, keep the faster way for `shape`, and return its result."""
        whole_result, whole_s = self.seconds(whole)
        shared_result, shared_s = self.seconds(shared)
        self.shared[shape] = shared_s < whole_s
        return shared_result if self.shared[shape] else whole_result


def choice_for(model, use: str) -> ReadingChoice:
    """The measured choices of one use of a model (scoring; the fast engine, at any layer: both ways
    run the same blocks after it, so the layer does not change which is faster), kept as long as
    the model lives; a change of dtype or devices starts afresh."""
    on = devices(model)
    key = f"{use} {model.dtype} {','.join(map(str, on))}"
    uses = _CHOICES.setdefault(model, {})
    return uses.setdefault(key, ReadingChoice(on))
