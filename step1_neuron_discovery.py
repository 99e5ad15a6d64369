"""Step 1: discover which delta neurons of a Mamba layer matter, by ablating each one on its own.

A delta neuron is one channel i of a Mamba layer's SSM time-step projection, dt_pre = dt_proj(...),
whose softplus is the channel's step Δ: how fast its state forgets and takes in each token.

    python step1_neuron_discovery.py --save_path discovered_neurons.json
    python step1_neuron_discovery.py --model models/mamba-tiny-demo --device cpu \\
        --tasks models/mamba-tiny-demo/demo_data/copying.jsonl --save_path out.json --neurons 0-31

Baseline accuracy on the discovery examples, per-neuron delta variance on Pile texts, then every
neuron in --neurons ablated alone: impact = baseline - ablated accuracy (points; positive = the
neuron helps), with a paired bootstrap 95% CI, an exact sign-test p-value and BH q-values. The
groups step 2 amplifies: High Impact (impact > --high_impact_cut points, 2 by default) and Neutral
(|impact| <= the cut); the cut is a size, not a significance test. The summary ends with the
smallest impact this run can detect (80% power, alpha 0.05).
"""

from __future__ import annotations

import argparse

from delta_steering.cli import (add_discovery_args, add_model_args, add_pile_args, add_run_args, add_sweep_args,
                                step_parser)
from delta_steering.options import METHODS, DiscoverOptions
from delta_steering.steps.script import step_main


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_model_args(parser)
    add_discovery_args(parser, DiscoverOptions, "discovery", "ablation_3_results", "plots")
    parser.add_argument("--layer", type=int, default=DiscoverOptions.layer,
                        help="the layer whose delta neurons are ablated")
    parser.add_argument("--threshold", type=float, default=DiscoverOptions.threshold,
                        help="the original study's beneficial list: impact >= THRESHOLD points (at -2 nearly every "
                             "neuron passes); it does not make the groups")
    parser.add_argument("--high_impact_cut", type=float, default=DiscoverOptions.high_impact_cut, metavar="POINTS",
                        help="High Impact group: impact > POINTS; Neutral group: |impact| <= POINTS (a size, not a "
                             "significance test)")
    parser.add_argument("--neurons", default=None, help="ids and ranges, e.g. 0-127 (default: all)")
    add_sweep_args(parser)
    parser.add_argument("--method", default=DiscoverOptions.method, choices=list(METHODS),
                        help="exact: every neuron ablated exactly; attribution: first-order estimates of every "
                             "neuron, then --verify_top re-measured exactly, and --recall_sample of the rest at "
                             "random to measure the screen's recall; auto (default): exact when the fast engine's "
                             "projected time is within --exact_budget, attribution otherwise")
    parser.add_argument("--exact_budget", type=float, default=DiscoverOptions.exact_budget, metavar="SECONDS",
                        help="--method auto: the longest projected exact sweep that runs exact")
    parser.add_argument("--verify_top", type=int, default=DiscoverOptions.verify_top,
                        help="neurons re-measured exactly after attribution")
    parser.add_argument("--recall_sample", type=int, default=DiscoverOptions.recall_sample,
                        help="screened-out neurons measured exactly at random (seeded by --seed): the screen's "
                             "estimated recall")
    add_pile_args(parser)
    add_run_args(parser)
    return parser


main = step_main(build_parser, DiscoverOptions, "discover")


if __name__ == "__main__":
    main()
