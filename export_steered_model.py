"""Export a steered model as an ordinary checkpoint that any tool loads (transformers, lm-eval, vLLM).

    python export_steered_model.py --steer 20:4,38,84:5 --out mamba-130m-steered
    python export_steered_model.py --from_step2 cluster9_ablation_results/cluster9_ablation_results_all_neurons.json \\
        --out mamba-130m-steered
    python export_steered_model.py --model models/mamba-tiny-demo --steer 3:0-7:0 --ablation mean \\
        --pile_path texts.txt --out demo-mean-ablated

Writes OUT: the source's config, generation config and tokenizer, its safetensors weights in their
own dtype with the rows that make dt_pre edited as the steering says (every other tensor
byte-identical), and steering.json: what was applied, to which source (id and weight digests) and
the original values of every edited row, to undo it. Load it with
`AutoModelForCausalLM.from_pretrained(OUT)`: no import of this project needed.
"""

from __future__ import annotations

import argparse

from delta_steering.cli import add_pile_args, add_placement_args, add_source_args, add_steering_args, step_parser
from delta_steering.options import ExportOptions
from delta_steering.steps.script import step_main


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_source_args(parser)
    add_placement_args(parser, device="cpu")
    add_steering_args(parser)
    parser.add_argument("--ablation", default=ExportOptions.ablation, choices=["zero", "mean"],
                        help="what factor 0 does: zero: dt_pre set to 0; mean: set to its mean over the statistics "
                             "documents (--pile_path)")
    add_pile_args(parser)
    parser.add_argument("--seed", type=int, default=ExportOptions.seed, help="seeds Pile sampling (mean ablation)")
    parser.add_argument("--out", required=True, help="the checkpoint directory to write (new or empty)")
    return parser


main = step_main(build_parser, ExportOptions, "export")


if __name__ == "__main__":
    main()
