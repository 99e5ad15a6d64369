"""The delta atlas: which layer's delta neurons matter, every SSM layer at once.

    python delta_atlas.py --save_path atlas.json
    python delta_atlas.py --model models/mamba-tiny-demo --device cpu \\
        --tasks models/mamba-tiny-demo/demo_data/copying.jsonl --save_path atlas.json --verify_top 5 \\
        --step1_layer 3 --save_step1 step1_layer3.json

Every delta neuron of every SSM layer (or of --layers) ablated alone, estimated to first order by
attribution from one forward and one backward pass per batch; the --verify_top neurons of each layer
with the largest estimated impact re-measured exactly (impact = baseline - ablated accuracy, points,
with a paired bootstrap 95% CI and an exact sign test); Benjamini-Hochberg over every neuron of every
layer, unmeasured ones as p = 1. --step1_layer L --save_step1 PATH also writes layer L as a step-1
file that step 2 reads. Attribution covers the Mamba-1 families (mamba, falcon_mamba).
"""

from __future__ import annotations

import argparse

from delta_steering.cli import (add_discovery_args, add_model_args, add_pile_args, add_run_args, add_sweep_args,
                                step_parser)
from delta_steering.errors import UsageError
from delta_steering.options import AtlasOptions
from delta_steering.steps.script import step_main


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_model_args(parser)
    add_discovery_args(parser, AtlasOptions, "atlas", "atlas_results", "the figure")
    parser.add_argument("--layers", default=None, help="SSM layers, ids and ranges, e.g. 16-23 (default: all)")
    parser.add_argument("--verify_top", type=int, default=AtlasOptions.verify_top,
                        help="neurons of each layer re-measured exactly")
    parser.add_argument("--recall_sample", type=int, default=AtlasOptions.recall_sample,
                        help="neurons the screen left out (of all layers) measured exactly at random (seeded by "
                             "--seed): the screen's estimated recall")
    parser.add_argument("--threshold", type=float, default=AtlasOptions.threshold,
                        help="beneficial neurons of the --save_step1 file: impact >= threshold (points)")
    parser.add_argument("--step1_layer", type=int, default=None, help="the layer --save_step1 writes")
    parser.add_argument("--save_step1", default=None, help="write --step1_layer as a step-1 file for step 2")
    add_sweep_args(parser)
    add_pile_args(parser)
    add_run_args(parser)
    return parser


def check_step1_args(args: argparse.Namespace) -> None:
    if (args.step1_layer is None) != (args.save_step1 is None):
        raise UsageError("--step1_layer and --save_step1 go together: the layer, and where its step-1 file goes")


main = step_main(build_parser, AtlasOptions, "atlas", check=check_step1_args)


if __name__ == "__main__":
    main()
