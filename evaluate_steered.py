"""Any lm-evaluation-harness benchmark under delta-neuron steering, against the unsteered model.

    python evaluate_steered.py --tasks mmlu,gsm8k --steer 20:4,38,100-110:5
    python evaluate_steered.py --tasks truthfulqa_mc2 --from_step2 cluster9_ablation_results/cluster9_ablation_results_all_neurons.json
    python evaluate_steered.py --model models/mamba-tiny-demo --device cpu --tasks piqa --data_dir DIR \\
        --steer 20:20,73,120:2 --limit 50

The model is loaded by this project's loader and steered through its weights (`steer`), so the
steering holds on every code path lm-eval takes (batched log-likelihood, generation with a cache).
lm-eval's `simple_evaluate` runs once on the unsteered model and once with every --steer applied.
Writes lm-eval's results JSON for each, and a comparison per task and metric: both values with the
harness's stderr, Δ, and a paired 95% CI and sign test over the documents.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import delta_steering as ds
from delta_steering.cli import (add_model_args, add_steering_args, check_device, check_output_dir, check_positive,
                                main_guard, parse_names, parse_steer, step_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("--tasks", required=True, help="lm-eval task, tag or group names, comma-separated")
    add_steering_args(parser)
    parser.add_argument("--allow_model_mismatch", action="store_true",
                        help="use a step-2 file made with another model (recorded in comparison.json)")
    parser.add_argument("--data_dir", default=None, help="local task data: DIR/<task>/<split>.jsonl (default: the Hub)")
    parser.add_argument("--limit", type=int, default=None, help="the first N documents of each task (default: all)")
    parser.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    parser.add_argument("--gen_kwargs", default=None,
                        help="generation settings for generative tasks, as lm-eval takes them, e.g. max_gen_toks=64")
    parser.add_argument("--output_dir", default="steered_evaluation", help="results JSONs")
    return parser


def parse_args() -> tuple[argparse.Namespace, list]:
    """The arguments, checked (everything that can be wrong without the model fails here), and the
    --steer steerings."""
    args = build_parser().parse_args()
    if bool(args.steer) == bool(args.from_step2):
        raise ds.UsageError("give --steer LAYER:NEURONS:FACTOR (one or more) or --from_step2 FILE")
    args.batch_size = args.batch_size or 8
    for flag in ("limit", "batch_size"):
        check_positive(getattr(args, flag), f"--{flag}")
    custom = [name for name in parse_names(args.tasks) if name.endswith(".jsonl")]
    if custom:
        raise ds.UsageError(f"--tasks {custom[0]}: evaluate_steered.py runs lm-eval tasks only; a .jsonl task file is "
                            "scored by steps 1 and 2 (--tasks FILE.jsonl there)")
    check_device(args.device)
    check_output_dir(args.output_dir, "--output_dir")
    return args, [parse_steer(text) for text in args.steer]


def run(model, tokenizer, args, steerings: list) -> dict:
    """lm-eval's results on fresh task objects, with `steerings` installed (none: unsteered)."""
    tasks = ds.data.harness.benchmark_tasks(parse_names(args.tasks), args.data_dir)
    with ds.model.steering.apply(model, steerings):
        return ds.data.harness.evaluate(model, tokenizer, tasks, args.limit, args.num_fewshot, args.batch_size, args.seed,
                                   args.gen_kwargs)


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


def paired(plain: list[dict], steered: list[dict], metric: str, filter_name: str, seed: int) -> dict:
    """Δ over the documents both runs scored, its paired bootstrap 95% CI and sign-test p (lm-eval's
    units); None where the metric is not a per-document number."""
    base = ds.data.harness.per_document(plain, metric, filter_name)
    other = ds.data.harness.per_document(steered, metric, filter_name)
    docs = sorted(set(base) & set(other))
    if not docs:
        return {"delta": None, "ci95": None, "p_value": None, "n": 0}
    indices = ds.analysis.stats.bootstrap_indices(np.zeros(len(docs)), seed=seed)
    result = ds.analysis.stats.compare(np.array([base[d] for d in docs]), np.array([other[d] for d in docs]), indices,
                              weights=np.full(len(docs), 1.0 / len(docs)))
    return {**result, "n": len(docs)}


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


def save(args, plain: dict, steered: dict, comparison: "ds.artifacts.Results") -> None:
    """lm-eval's results JSON of each run (without the per-document samples) and the comparison."""
    out = Path(args.output_dir)
    for name, result in (("unsteered", plain), ("steered", steered)):
        path = ds.results_io.write_json(out / f"{name}_results.json", ds.data.harness.results_json(result))
        print(f"lm-eval results: {path}")
    print(f"comparison: {ds.results_io.write_json(out / 'comparison.json', comparison.to_json())}")


DESCRIPTION = (
    "lm-eval benchmarks, unsteered and steered (every `steering` entry applied together through the weights). "
    "tasks.<task>.<metric,filter>: lm-eval's value and stderr for each run, in lm-eval's units; delta = steered - "
    "unsteered; ci95 = paired bootstrap 95% CI of delta over the documents both runs scored; p_value = exact sign "
    "test over the documents whose score changed.")


@main_guard
def main() -> None:
    args, steerings = parse_args()
    started = time.time()
    source = ds.model.loading.check_model_source(args.model, args.tokenizer)
    factor_source, inputs, transferred = "command-line", {}, {}
    if args.from_step2:
        step2 = ds.artifacts.step2_steering(args.from_step2, source, args.allow_model_mismatch)
        print("\n".join(step2.notes))
        steerings, factor_source, transferred = [step2.steering], step2.factor_source, step2.transferred
        inputs = {"step2_file": step2.factors}
    for steering in steerings:
        ds.model.sites.check_layer(source.shape, steering.layer, "--steer layer")
        ds.model.sites.check_neurons(source.shape, steering.neurons, "--steer")
    ds.data.harness.check_names(parse_names(args.tasks), args.data_dir)  # before the model loads
    model, tokenizer = ds.model.loading.load_model(source, args.device, args.dtype, args.max_memory,
                                                   args.offload_folder)
    ds.model.steering.verify_steering_effect(model, steerings)
    print("unsteered:")
    plain = run(model, tokenizer, args, [])
    print("steered: " + "; ".join(s.describe() for s in steerings))
    steered = run(model, tokenizer, args, steerings)
    table = compare_results(plain, steered, args.seed)
    print_table(table)
    layers = {s.layer for s in steerings}
    comparison = ds.artifacts.Results(
        ds.artifacts.Provenance.of(source, layers.pop() if len(layers) == 1 else None, inputs, transferred),
        step="evaluate_steered",
        report={"description": DESCRIPTION, "steering": [s.to_json() for s in steerings],
                "factor_source": factor_source, "tasks": table,
                "run": ds.results_io.run_record(args, ds.model.loading.describe(model), started)})
    save(args, plain, steered, comparison)


if __name__ == "__main__":
    main()
