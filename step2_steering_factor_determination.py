"""Step 2: determine steering factors for the delta neurons found in step 1, on held-out examples.

    python step2_steering_factor_determination.py --neurons_file discovered_neurons.json
    python step2_steering_factor_determination.py --model models/mamba-tiny-demo --device cpu \\
        --neurons_file demo_results/discovered_neurons.json --perplexity_ablation --pile_path texts.txt

Amplifies step 1's groups, each as a whole, by each factor: High Impact (ablating the neuron alone
cost more than the step-1 file's high_impact_cut, 2 points by default) and Neutral (|impact| within
the cut). The held-out examples are split into a selection half, where each group's factor is
chosen (the baseline, factor 1, is a candidate), and a confirmation half, where the chosen factor's
gain is tested once; the summary gives the smallest gain that half can detect (80% power, alpha
0.05). Also re-measures single-neuron impacts on held-out examples (does the discovery replicate?),
and with --perplexity_ablation Pile perplexity with the High Impact neurons steered at each layer,
each change with a per-document bootstrap 95% CI.
"""

from __future__ import annotations

import argparse

from delta_steering.cli import (add_model_args, add_pile_args, add_run_args, add_step1_file_args, add_sweep_args,
                                step_parser)
from delta_steering.options import FactorOptions
from delta_steering.steps.script import step_main


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("--num_examples", type=int, default=FactorOptions.num_examples,
                        help="held-out examples per task, split into selection and confirmation halves")
    parser.add_argument("--output_dir", default="cluster9_ablation_results",
                        help="results, plots and the resume checkpoint")
    add_step1_file_args(parser, "a step-1 file")
    parser.add_argument("--tasks", default=None, help="default: the step-1 file's tasks")
    parser.add_argument("--data_dir", default=None, help="default: the step-1 file's data_dir")
    parser.add_argument("--factors", default=",".join(f"{f:g}" for f in FactorOptions.factors),
                        help="amplification factors tried on each group (factor 1, the baseline, always is)")
    parser.add_argument("--max_neurons", type=int, default=None, metavar="N",
                        help="importance ranking: re-measure on held-out examples only the N step-1 neurons of "
                             "largest |impact|, each ablated alone (default: every neuron step 1 measured)")
    parser.add_argument("--sample_neurons", type=int, default=None, metavar="N",
                        help="importance ranking: N step-1 neurons drawn at random (seeded) instead")
    add_sweep_args(parser)
    parser.add_argument("--perplexity_ablation", action="store_true",
                        help="Pile perplexity with the High Impact neurons ablated (x0) and amplified by the "
                             "group's factor at each layer, each change with a per-document bootstrap 95%% CI")
    parser.add_argument("--perplexity_layers", default=None, help="layers for --perplexity_ablation (default: all)")
    add_pile_args(parser)
    add_run_args(parser)
    return parser


main = step_main(build_parser, FactorOptions, "determine_factors")


if __name__ == "__main__":
    main()
