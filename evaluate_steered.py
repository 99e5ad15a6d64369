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

from delta_steering.cli import add_model_args, add_steering_args, step_parser
from delta_steering.options import EvaluateOptions
from delta_steering.steps.script import step_main


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_model_args(parser, batch_size=EvaluateOptions.batch_size)
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


main = step_main(build_parser, EvaluateOptions, "evaluate")


if __name__ == "__main__":
    main()
