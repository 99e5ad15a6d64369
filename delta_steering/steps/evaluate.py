"""Any lm-evaluation-harness benchmark under delta-neuron steering, against the unsteered model:
lm-eval's `simple_evaluate` once unsteered and once with every steering applied through the weights,
and per task and metric both values, Δ, a paired bootstrap CI and sign test over the documents.
`evaluate` returns the comparison's contract and both of lm-eval's results."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..analysis.stats import bootstrap_indices, compare
from ..artifacts import Provenance, Results, step2_steering
from ..data import harness
from ..errors import UsageError
from ..intervention import Steering
from ..model.loading import ModelSource, describe
from ..model.sites import check_layer, check_neurons
from ..model.steering import apply, verify_steering_effect
from ..options import EvaluateOptions
from ..results_io import write_json
from .driver import Step, run_step

DESCRIPTION = (
    "lm-eval benchmarks, unsteered and steered (every `steering` entry applied together through the weights). "
    "tasks.<task>.<metric,filter>: lm-eval's value and stderr for each run, in lm-eval's units; delta = steered - "
    "unsteered; ci95 = paired bootstrap 95% CI of delta over the documents both runs scored; p_value = exact sign "
    "test over the documents whose score changed.")


@dataclass(frozen=True)
class Evaluation:
    """The comparison file and lm-eval's results of each run (per-document samples included)."""

    comparison: Results
    unsteered: dict
    steered: dict

    def to_json(self) -> dict:
        return self.comparison.to_json()


@dataclass(frozen=True)
class Plan:
    """The evaluation's inputs, checked before the model loads: the steerings (from --steer or the
    step-2 file) and the provenance of the comparison."""

    options: EvaluateOptions
    steerings: list[Steering]
    factor_source: str
    provenance: Provenance | None
    inputs: dict = field(default_factory=dict)


@dataclass
class Context:
    provenance: dict
    model_info: dict
    timings: dict


def plan(options: EvaluateOptions, source: ModelSource) -> Plan:
    steerings, factor_source, inputs, transferred = list(options.steer), "command-line", {}, {}
    if options.from_step2:
        step2 = step2_steering(options.from_step2, source, options.allow_model_mismatch)
        print("\n".join(step2.notes))
        steerings, factor_source, transferred = [step2.steering], step2.factor_source, step2.transferred
        inputs = {"step2_file": step2.factors}
    for steering in steerings:
        check_layer(source.shape, steering.layer, "--steer layer")
        check_neurons(source.shape, steering.neurons, "--steer")
    harness.check_names(list(options.tasks), options.data_dir)  # before the model loads
    layers = {s.layer for s in steerings}
    provenance = Provenance.of(source, layers.pop() if len(layers) == 1 else None, inputs, transferred)
    return Plan(options, steerings, factor_source, provenance)


def run_harness(model, tokenizer, options: EvaluateOptions, steerings: list[Steering]) -> dict:
    """lm-eval's results dict (with the per-document samples) on fresh task objects, `steerings`
    installed (none: unsteered), through lm-eval's HFLM wrapper of the loaded model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = harness.benchmark_tasks(list(options.tasks), options.data_dir)
    harness.quiet()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=options.batch_size)
    no_index = TaskManager(include_defaults=False)  # the tasks are built already: spare the index of every YAML
    with apply(model, steerings):
        return simple_evaluate(model=lm, tasks=list(tasks.values()), limit=options.limit,
                               num_fewshot=options.num_fewshot, gen_kwargs=options.gen_kwargs, log_samples=True,
                               task_manager=no_index, random_seed=options.seed, numpy_random_seed=options.seed,
                               torch_random_seed=options.seed, fewshot_random_seed=options.seed)


def measure(model, tokenizer, plan: Plan, run) -> tuple[Context, dict]:
    """lm-eval's results unsteered and steered."""
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has neither a BOS nor an EOS token, which lm-eval needs (to prefix an empty "
                         "context and to end generation): give one with an eos_token (--tokenizer)")
    verify_steering_effect(model, plan.steerings)
    print("unsteered:")
    plain = run_harness(model, tokenizer, plan.options, [])
    print("steered: " + "; ".join(s.describe() for s in plan.steerings))
    steered = run_harness(model, tokenizer, plan.options, plan.steerings)
    return Context(plan.provenance.to_json(), describe(model), {}), {"unsteered": plain, "steered": steered}


def paired(plain: list[dict], steered: list[dict], metric: str, filter_name: str, seed: int) -> dict:
    """Δ over the documents both runs scored, its paired bootstrap 95% CI and sign-test p (lm-eval's
    units); None where the metric is not a per-document number."""
    base = harness.per_document(plain, metric, filter_name)
    other = harness.per_document(steered, metric, filter_name)
    docs = sorted(set(base) & set(other))
    if not docs:
        return {"delta": None, "ci95": None, "p_value": None, "n": 0}
    indices = bootstrap_indices(np.zeros(len(docs)), seed=seed)
    result = compare(np.array([base[d] for d in docs]), np.array([other[d] for d in docs]), indices,
                     weights=np.full(len(docs), 1.0 / len(docs)))
    return {**result, "n": len(docs)}


def compare_results(plain: dict, steered: dict, seed: int) -> dict:
    """Per task and metric: both values with the harness's stderr, Δ, paired CI and sign test."""
    table = {}
    for task, values in plain["results"].items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr") or not filter_name or not isinstance(value, (int, float)):
                continue
            other = steered["results"].get(task, {}).get(key)
            entry = {"unsteered": value, "unsteered_stderr": _stderr(values, metric, filter_name), "steered": other,
                     "steered_stderr": _stderr(steered["results"].get(task, {}), metric, filter_name)}
            entry.update(paired(plain.get("samples", {}).get(task, []), steered.get("samples", {}).get(task, []),
                                metric, filter_name, seed))
            table.setdefault(task, {})[key] = entry
    return table


def _stderr(values: dict, metric: str, filter_name: str):
    stderr = values.get(f"{metric}_stderr,{filter_name}")
    return stderr if isinstance(stderr, (int, float)) else None


def print_table(table: dict) -> None:
    print(f"\n  {'task':<28} {'metric':<22} {'unsteered':>16} {'steered':>16} {'Δ':>8} {'95% CI':>18} {'p':>7}")
    for task, metrics in table.items():
        for key, e in metrics.items():
            def shown(value, stderr):
                return "n/a" if value is None else f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")
            delta = "" if e["delta"] is None else f"{e['delta']:+.4f}"
            ci = "" if e["ci95"] is None else f"[{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}]"
            p = "" if e["p_value"] is None else f"{e['p_value']:.3g}"
            print(f"  {task:<28} {key:<22} {shown(e['unsteered'], e['unsteered_stderr']):>16} "
                  f"{shown(e['steered'], e['steered_stderr']):>16} {delta:>8} {ci:>18} {p:>7}")


def report(plan: Plan, context: Context, results: dict, run: dict) -> Evaluation:
    table = compare_results(results["unsteered"], results["steered"], plan.options.seed)
    print_table(table)
    comparison = Results(Provenance(**context.provenance), step="evaluate_steered", report={
        "description": DESCRIPTION, "steering": [s.to_json() for s in plan.steerings],
        "factor_source": plan.factor_source, "tasks": table, "run": run})
    return Evaluation(comparison, results["unsteered"], results["steered"])


def save(evaluation: Evaluation, args: argparse.Namespace) -> None:
    """lm-eval's results JSON of each run (without the per-document samples) and the comparison."""
    out = Path(args.output_dir)
    for name, result in (("unsteered", evaluation.unsteered), ("steered", evaluation.steered)):
        path = write_json(out / f"{name}_results.json", harness.results_json(result))
        print(f"lm-eval results: {path}")
    print(f"comparison: {write_json(out / 'comparison.json', evaluation.to_json())}")


STEP = Step("evaluate_steered", EvaluateOptions, plan, measure, Context, report, save)


def evaluate(model, tokenizer, *, output_dir=None, **options) -> Evaluation:
    """lm-eval benchmarks on a loaded model, unsteered and steered: `options` are `EvaluateOptions`'
    fields (tasks=["piqa"], steer=[Steering(...)] or from_step2=PATH, limit=...)."""
    return run_step(STEP, model, tokenizer, options, output_dir)
