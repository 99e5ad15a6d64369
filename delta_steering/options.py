"""Each step's options as a typed, serialisable config: the fields are the command-line options (by
the same names, as Python values: a list of ints, not "0-15"), the defaults are the original study's,
and `check` refuses what can be wrong without a model. The scripts take their defaults from here and
the library's step functions take these fields as keyword arguments."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from .errors import UsageError
from .intervention import ABLATIONS, Steering, check_factor

DEFAULT_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
DEFAULT_FACTORS = (0.1, 0.25, 0.5, 0.75, 1.5, 2.0, 3.0, 5.0, 7.0, 9.0, 10.0, 20.0, 50.0, 100.0)
ENGINES = ("fast", "naive")  # engine.sweep's engines: the exact fast one, the whole model per neuron
METHODS = ("auto", "exact", "attribution")  # auto: exact when its projected time is within exact_budget
MODES = ("combined", "cluster_ablation", "layer_ablation")  # step 3, the original study's names
IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                  "inst_level_loose_acc")


def check_positive(value: int | None, flag: str, least: int = 1) -> None:
    """A size or count: None (not given) or an integer of at least `least` (1; 0 for a count that may be none)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise UsageError(f"{flag} must be at least {least}, got {value}")


def check_tasks(tasks, flag: str = "--tasks") -> None:
    """A task list that names at least one task and none twice (a task file by its real path, a task
    by its name whatever metric follows it): a task counted twice doubles the sample every CI rests on."""
    if tasks is None:
        return
    if not tasks:
        raise UsageError(f"{flag} names no task")
    seen: dict[str, str] = {}
    for spec in map(str, tasks):
        key = os.path.realpath(spec) if spec.endswith(".jsonl") else spec.partition(":")[0]
        if key in seen:
            also = "" if seen[key] == spec else f" (as {seen[key]} and {spec})"
            raise UsageError(f"{flag} names task {spec} twice{also}: its examples would count twice")
        seen[key] = spec


def check_choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value!r}: use one of {', '.join(choices)}")


@dataclass(frozen=True)
class Options:
    """What every step's options share: how the work is batched and seeded."""

    SIZES: ClassVar[tuple[str, ...]] = ("batch_size",)  # sizes and counts: None (not given) or at least 1
    COUNTS: ClassVar[tuple[str, ...]] = ("seed",)  # None (not given) or at least 0

    batch_size: int | None = None  # sequences per forward (default: as many as fit); results do not depend on it
    seed: int = 0  # seeds Pile sampling, random sets and bootstrap CIs

    def check(self) -> "Options":
        """The options, checked; a UsageError names the first bad one as its command-line flag."""
        for name in self.SIZES:
            check_positive(getattr(self, name), f"--{name}")
        for name in self.COUNTS:
            check_positive(getattr(self, name), f"--{name}", least=0)
        check_tasks(getattr(self, "tasks", None))
        if hasattr(self, "ablation"):
            check_choice(self.ablation, ABLATIONS, "--ablation")
        return self

    def to_json(self) -> dict[str, Any]:
        """The options as JSON values (step files and steerings by their path or record)."""
        def plain(value):
            if isinstance(value, Steering):
                return value.to_json()
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value if value is None or isinstance(value, (bool, int, float, str)) else str(getattr(
                value, "path", value))
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def of(cls, options: dict[str, Any]) -> "Options":
        """Options from keyword arguments, an unknown name refused in one line."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r}; the options are {', '.join(f.name for f in fields(cls))}")
        return cls(**options).check()


@dataclass(frozen=True)
class PileOptions(Options):
    SIZES = Options.SIZES + ("pile_samples",)

    pile_samples: int = 100  # Pile documents (delta statistics, perplexity)
    pile_path: str | None = None  # a local Pile file or folder (default: the Hub)


@dataclass(frozen=True)
class SweepOptions(PileOptions):
    SIZES = PileOptions.SIZES + ("chunk_neurons",)

    engine: str = "fast"  # fast: exact, from a shared prefix; naive: the whole model per neuron (the reference)
    chunk_neurons: int = 64  # neurons per unit of work (checkpointed and shared between processes)

    def check(self) -> "SweepOptions":
        check_choice(self.engine, ENGINES, "--engine")
        return super().check()


@dataclass(frozen=True)
class DiscoverOptions(SweepOptions):
    """Step 1: each delta neuron of `layer` ablated alone on the discovery examples."""

    SIZES = SweepOptions.SIZES + ("validation_size", "verify_top", "recall_sample")
    tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS
    data_dir: str | None = None
    layer: int = 20
    neurons: list[int] | None = None  # default: every delta neuron of the layer
    validation_size: int = 200
    threshold: float = -2.0
    high_impact_cut: float = 2.0
    ablation: str = "zero"
    method: str = "auto"
    exact_budget: float = 1800.0  # seconds: --method auto measures exactly when the projected time is within it
    verify_top: int = 50
    recall_sample: int = 32  # screened-out neurons measured exactly, at random, to estimate the screen's recall

    def check(self) -> "DiscoverOptions":
        if not self.high_impact_cut >= 0:
            raise UsageError(f"--high_impact_cut must be 0 or more points, got {self.high_impact_cut}")
        if not self.exact_budget >= 0:
            raise UsageError(f"--exact_budget must be 0 or more seconds, got {self.exact_budget}")
        check_choice(self.method, METHODS, "--method")
        return super().check()


@dataclass(frozen=True)
class AtlasOptions(SweepOptions):
    """The atlas: every delta neuron of every SSM layer (or of `layers`) screened, the top verified."""

    SIZES = SweepOptions.SIZES + ("validation_size", "verify_top", "recall_sample")
    tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS
    data_dir: str | None = None
    layers: list[int] | None = None  # default: every SSM layer
    validation_size: int = 200
    verify_top: int = 20
    recall_sample: int = 32  # screened-out neurons (of all layers) measured exactly, at random: the screen's recall
    threshold: float = -2.0
    step1_layer: int | None = None
    ablation: str = "zero"


@dataclass(frozen=True)
class FactorOptions(SweepOptions):
    """Step 2: step 1's groups amplified by each factor on held-out examples."""

    SIZES = SweepOptions.SIZES + ("max_neurons", "sample_neurons")
    neurons_file: Any = None  # a step-1 file's path, or a Discovery
    allow_model_mismatch: bool = False
    layer: int | None = None  # default: the step-1 file's layer
    transfer_layer: bool = False
    tasks: list[str] | None = None  # default: the step-1 file's tasks
    data_dir: str | None = None  # default: the step-1 file's data_dir
    num_examples: int = 100
    factors: tuple[float, ...] | list[float] = DEFAULT_FACTORS
    max_neurons: int | None = None
    sample_neurons: int | None = None
    perplexity_ablation: bool = False
    perplexity_layers: list[int] | None = None  # default: every SSM layer

    def check(self) -> "FactorOptions":
        if self.num_examples < 2:
            raise UsageError(f"--num_examples must be at least 2 (a selection and a confirmation half), got "
                             f"{self.num_examples}")
        if not self.factors:
            raise UsageError("--factors is empty")
        for factor in self.factors:
            check_factor(factor, "--factors")
        if not self.steering_factors:
            raise UsageError("--factors names no steering factor other than 1 (the baseline)")
        if self.max_neurons is not None and self.sample_neurons is not None:
            raise UsageError("--max_neurons and --sample_neurons exclude each other: --max_neurons N ranks the N "
                             "neurons of largest step-1 |impact|, --sample_neurons N draws N at random; give one")
        return super().check()

    @property
    def steering_factors(self) -> list[float]:
        """The factors without factor 1 (the baseline, always a candidate), each once, in order."""
        return [float(f) for f in dict.fromkeys(self.factors) if f != 1]


@dataclass(frozen=True)
class VerifyOptions(PileOptions):
    """Step 3: steered configurations on IFEval and Pile perplexity against the baseline."""

    SIZES = PileOptions.SIZES + ("num_samples", "max_new_tokens")
    neurons_file: Any = None  # a step-1 file's path, or a Discovery
    factors_file: Any = None  # a step-2 file's path, or a Factors (unneeded with `factor`)
    factor: float | None = None  # default: the step-2 file's High Impact factor
    modes: tuple[str, ...] | list[str] = ("combined",)
    allow_model_mismatch: bool = False
    layer: int | None = None
    transfer_layer: bool = False
    layers: list[int] | None = None  # layer_ablation's layers (default: the 5 SSM layers around `layer`)
    num_samples: int = 100
    ifeval_path: str | None = None
    ifeval_metric: str = "prompt_level_strict_acc"
    max_new_tokens: int = 1280

    def check(self) -> "VerifyOptions":
        if self.factor is not None and check_factor(self.factor, "--factor") == 1:
            raise UsageError("--factor 1 is no steering: every configuration would equal the baseline")
        for mode in self.modes:
            check_choice(mode, MODES, "mode")
        check_choice(self.ifeval_metric, IFEVAL_METRICS, "--ifeval_metric")
        return super().check()


@dataclass(frozen=True)
class EvaluateOptions(Options):
    """lm-eval benchmarks, unsteered and with every steering applied together."""

    SIZES = Options.SIZES + ("limit",)
    COUNTS = Options.COUNTS + ("num_fewshot",)
    tasks: list[str] = ()
    steer: list[Steering] = ()
    from_step2: Any = None  # a step-2 file's path: its High Impact steering instead of `steer`
    allow_model_mismatch: bool = False
    data_dir: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    gen_kwargs: str | None = None
    batch_size: int | None = 8

    def check(self) -> "EvaluateOptions":
        if bool(self.steer) == bool(self.from_step2):
            raise UsageError("give --steer LAYER:NEURONS:FACTOR (one or more) or --from_step2 FILE")
        custom = [name for name in self.tasks if str(name).endswith(".jsonl")]
        if custom:
            raise UsageError(f"--tasks {custom[0]}: evaluate_steered.py runs lm-eval tasks only; a .jsonl task file "
                             "is scored by steps 1 and 2 (--tasks FILE.jsonl there)")
        return super().check()


@dataclass(frozen=True)
class ExportOptions(PileOptions):
    """A steered model written as an ordinary checkpoint."""

    out: str | Path = ""
    steer: list[Steering] = ()
    from_step2: Any = None
    ablation: str = "zero"

    def check(self) -> "ExportOptions":
        if bool(self.steer) == bool(self.from_step2):
            raise UsageError("give --steer LAYER:NEURONS:FACTOR (one or more) or --from_step2 FILE")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out} exists and is not an empty folder: choose a new one")
        return super().check()

