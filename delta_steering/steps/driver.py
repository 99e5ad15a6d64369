"""One lifecycle for every step, written once.

A script:  arguments -> options -> plan (every input checked, before the model loads) -> the run
           (output folder locked, checkpoint resumed, or shards merged) -> load -> measure -> report
           -> save and plot.
The library (`discover`, `determine_factors`, ...): a model already loaded, options as keyword
arguments -> plan -> measure -> report, the step's contract returned; nothing is kept on disk unless
`output_dir` is given (then the run checkpoints there and resumes, as a script does).

A step supplies the pieces (`Step`): its plan checks its options and inputs against the model's
source; its measurement returns what every process computes alike (a typed context) and the results
of its work items, by name; its report turns them into the contract.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..data.pile import local_files
from ..data.tasks import Example
from ..distributed import StepRun, fingerprint
from ..model import loading
from ..model.loading import ModelSource, check_model_source, source_of
from ..model.placement import input_device
from ..model.steering import check_finite_outputs
from ..options import Options
from ..results_io import command_line, file_digest, json_digest, run_record


@dataclass(frozen=True)
class Step:
    """A step of the method as the driver runs it."""

    name: str  # "step1", "step2", ...: its checkpoint, shard and lock files are named by it
    options: type[Options]
    plan: Callable[[Any, ModelSource | None], Any]  # (options, source; None when merging) -> the checked plan
    measure: Callable[[Any, Any, Any, StepRun], tuple[Any, dict]]  # (model, tokenizer, plan, run) -> context, results
    context: type  # the context's dataclass, read back from shard files
    report: Callable[[Any, Any, dict, dict], Any]  # (plan, context, results, run record) -> the contract
    save: Callable[[Any, argparse.Namespace], None]  # (contract, arguments): the script's files and figures
    load: Callable[[Any, str, str], tuple] | None = None  # (source, device, dtype) -> model, tokenizer


MODEL_INPUT = "the model's weights"  # the model's fingerprint among a run's inputs


def data_inputs(tasks=(), examples: list[Example] = (), pile_path: str | None = None,
                ifeval_path: str | None = None) -> dict[str, str]:
    """The digests of what a step reads besides its arguments, by what it is: each .jsonl task file,
    Pile file and IFEval file (SHA-256 of its bytes), and the examples of every other task (lm-eval
    builds them, from the Hub or --data_dir), so that a resume refuses a changed input by name."""
    files = [str(spec) for spec in tasks if str(spec).endswith(".jsonl")]
    inputs = {f"task file {spec}": file_digest(spec) for spec in files}
    built: dict[str, list] = {}
    for example in examples:
        if example.task not in {Path(spec).stem for spec in files}:
            built.setdefault(example.task, []).append(asdict(example))
    inputs.update({f"the examples of task {name}": json_digest(rows) for name, rows in built.items()})
    if pile_path:
        inputs.update({f"Pile file {path}": file_digest(path) for path in local_files(pile_path)})
    if ifeval_path:
        inputs[f"IFEval file {ifeval_path}"] = file_digest(Path(ifeval_path).expanduser())
    return inputs


@contextmanager
def timed(timings: dict, phase: str) -> Iterator[None]:
    """Seconds spent in `phase`, rounded to 10 ms, recorded in `timings` (the run record's)."""
    start = time.time()
    yield
    timings[phase] = round(time.time() - start, 2)


def run_step(step: Step, model, tokenizer, options: dict, output_dir=None, overwrite: bool = False):
    """A step on a loaded model: its contract (`step.report`'s), the same as the script's file for
    the same options. With `output_dir`, the work is checkpointed there and a rerun resumes."""
    started = time.time()
    checked = step.options.of(options)
    source = source_of(model)
    plan = step.plan(checked, source)
    device = str(input_device(model))
    check_finite_outputs(model)
    arguments = {"model": source.name, **checked.to_json()}
    run = StepRun(step.name, fingerprint(arguments, {**plan.inputs, MODEL_INPUT: source.digest}), output_dir,
                  overwrite=overwrite, device=device)
    context, results = step.measure(model, tokenizer, plan, run)
    command = f"delta_steering.{step.name}({', '.join(f'{k}={v!r}' for k, v in options.items())})"
    contract = step.report(plan, context, results, record(command, arguments, context, started))
    run.close()
    return contract


def run_script(step: Step, args: argparse.Namespace, options: Options) -> None:
    """A step as its script runs it: `args` the parsed command line (model, device, output folder,
    shards), `options` the step's options taken from it."""
    started = time.time()
    merge = getattr(args, "merge", None)  # the run options of the steps that checkpoint (add_run_args)
    source = None if merge is not None else check_model_source(args.model, args.tokenizer)
    plan = step.plan(options, source)
    device, dtype = getattr(args, "device", "cpu"), getattr(args, "dtype", "float32")
    arguments = {"model": args.model, "tokenizer": args.tokenizer, "dtype": dtype, **options.to_json()}
    inputs = {**plan.inputs, **({MODEL_INPUT: source.digest} if source is not None else {})}  # a merge loads none
    run = StepRun(step.name, fingerprint(arguments, inputs), getattr(args, "output_dir", None),
                  overwrite=getattr(args, "overwrite", False), shard=getattr(args, "shard", None), merge=merge,
                  device=device)
    try:
        if merge is not None:
            measured, results = run.merged()
            context = step.context(**measured)
        else:
            model, tokenizer = (step.load or loading.load_model)(source, run.device, dtype,
                                                                 getattr(args, "max_memory", None),
                                                                 getattr(args, "offload_folder", None))
            check_finite_outputs(model)
            context, results = step.measure(model, tokenizer, plan, run)
        if run.publish(asdict(context), results):
            contract = step.report(plan, context, results, record(command_line(), vars(args), context, started))
            with run.saving():
                step.save(contract, args)
    except BaseException:  # the checkpoint stays for a rerun; the lock goes now, so a refused run leaves no file
        if run.lock is not None:
            run.lock.release()
        raise
    run.close()


def save_figures(plot: Callable[[dict, str], list], result: dict, args: argparse.Namespace) -> None:
    """The step's figures in --output_dir, each path printed; none with --no_plots."""
    if not args.no_plots:
        for path in plot(result, args.output_dir):
            print(f"plot: {path}")


def record(command: str, arguments: dict, context, started: float) -> dict:
    """The run record of a step's file: the command, its arguments, the model, versions and timings."""
    return run_record(command, arguments, context.model_info, started, timings=context.timings)
