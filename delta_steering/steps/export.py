"""A steered model exported as an ordinary checkpoint that any tool loads (transformers, lm-eval,
vLLM): the source's safetensors with the rows that make dt_pre edited, every other tensor
byte-identical, and steering.json (what was applied, to which source, how to undo it). `export`
returns steering.json's contents."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from ..artifacts import Provenance, step2_steering
from ..data.pile import load_pile_texts, pile_record
from ..errors import UsageError
from ..intervention import Intervention, Steering
from ..model import export as checkpoint
from ..model.delta_stats import layer_delta_statistics
from ..model.loading import ModelSource, describe, load_model
from ..model.sites import check_layer, check_neurons
from ..model.steering import verify_steering_effect
from ..options import ExportOptions
from .driver import Step, run_step

STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors' names


@dataclass(frozen=True)
class Plan:
    """The export's inputs, checked before the model loads: the source's files, the steerings and
    the provenance of steering.json."""

    options: ExportOptions
    directory: Path
    steerings: list[Steering]
    extra: dict  # what steering.json records beside the steering (the step-2 factor's source)
    provenance: Provenance
    inputs: dict = field(default_factory=dict)


@dataclass
class Context:
    steering: dict  # steering.json's contents
    model_info: dict
    timings: dict


def source_directory(source: ModelSource) -> Path:
    """The checkpoint's files on disk: a local directory, or the Hub snapshot (downloaded into the cache)."""
    if source.original:
        raise UsageError(f"{source.name} is in mamba_ssm's original format; export starts from a transformers "
                         "checkpoint (e.g. state-spaces/mamba-130m-hf)")
    if source.local:
        return Path(source.path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source.path, revision=source.revision, allow_patterns=["*.json", "*.safetensors"]))


def stored_dtype(directory: Path) -> str:
    """The dtype the weights are stored in (that of the first floating tensor), to load them unchanged."""
    with safe_open(checkpoint.weight_files(directory)[0], framework="pt") as f:
        for key in f.keys():
            dtype = f.get_slice(key).get_dtype()
            if dtype in STORED_DTYPES:
                return STORED_DTYPES[dtype]
    return "float32"


def load_stored(source: ModelSource, device: str, dtype: str, max_memory: str | dict | None = None,
                offload_folder: str | None = None) -> tuple:
    """The source in the dtype its weights are stored in, whatever dtype was asked."""
    return load_model(source, device, stored_dtype(source_directory(source)), max_memory, offload_folder)


def plan(options: ExportOptions, source: ModelSource) -> Plan:
    steerings, inputs, extra = list(options.steer), {}, {}
    if options.from_step2:
        step2 = step2_steering(options.from_step2, source, allow_mismatch=None)
        print("\n".join(step2.notes))
        steerings, inputs["step2_file"], extra["factor_source"] = [step2.steering], step2.factors, step2.factor_source
    for steering in steerings:
        check_layer(source.shape, steering.layer, "--steer layer")
        check_neurons(source.shape, steering.neurons, "--steer")
    layers = {s.layer for s in steerings}
    provenance = Provenance.of(source, layers.pop() if len(layers) == 1 else None, inputs)
    return Plan(options, source_directory(source), steerings, extra, provenance)


def mean_ablated(model, tokenizer, options: ExportOptions, steerings: list[Steering]) -> tuple[list[Steering], dict]:
    """Factor-0 neurons set to their mean dt_pre over the statistics documents instead."""
    zeroed = sorted({s.layer for s in steerings if s.intervention.kind == "scale" and 0.0 in s.intervention.factors})
    if not zeroed:
        raise UsageError("--ablation mean applies to neurons steered by factor 0; no --steer has factor 0")
    texts = load_pile_texts(options.pile_samples, options.seed, options.pile_path, role="statistics")
    stats = layer_delta_statistics(model, tokenizer, texts, zeroed)
    out = []
    for steering in steerings:
        pairs = list(zip(steering.neurons, steering.intervention.factors or ()))
        ablated = [n for n, f in pairs if f == 0.0]
        if steering.layer not in zeroed or not ablated:
            out.append(steering)
            continue
        means = [float(v) for v in stats[steering.layer]["dt_pre_mean"]]
        out.append(Steering(steering.layer, Intervention.ablation("mean", ablated, means)))
        kept = [(n, f) for n, f in pairs if f != 0.0]
        if kept:
            out.append(Steering(steering.layer, Intervention.scale(*zip(*kept))))
    return out, {"documents": pile_record(texts, "statistics")}


def measure(model, tokenizer, plan: Plan, run) -> tuple[Context, dict]:
    """The checkpoint written to `out`; steering.json's contents in the context."""
    steerings, extra = plan.steerings, dict(plan.extra)
    if plan.options.ablation == "mean":
        steerings, extra["mean_ablation"] = mean_ablated(model, tokenizer, plan.options, steerings)
    verify_steering_effect(model, steerings)
    record = checkpoint.export_steered(model, tokenizer, plan.directory, plan.provenance.model,
                                       plan.provenance.model_digest, steerings,
                                       Path(plan.options.out), provenance=plan.provenance.to_json(), **extra)
    print(f"steered checkpoint: {plan.options.out} ({'; '.join(s.describe() for s in steerings)}); "
          f"undo and provenance in {Path(plan.options.out) / checkpoint.STEERING_FILE}")
    return Context(record, describe(model), {}), {}


def report(plan: Plan, context: Context, results: dict, run: dict) -> dict:
    return context.steering


def save(record: dict, args: argparse.Namespace) -> None:
    """Nothing more: the checkpoint and its steering.json are written as the export runs."""


STEP = Step("export", ExportOptions, plan, measure, Context, report, save, load=load_stored)


def export(model, tokenizer, *, out, **options) -> dict:
    """A steered checkpoint of a loaded model (in the dtype its weights are stored in) written to
    `out`: `options` are `ExportOptions`' other fields (steer=[Steering(...)] or from_step2=PATH,
    ablation). Returns steering.json's contents."""
    return run_step(STEP, model, tokenizer, {"out": out, **options})
