"""Step 3: verify delta-neuron steering on instruction following (IFEval) and Pile perplexity.

    python step3_steer_performance_verification.py                      # --combined
    python step3_steer_performance_verification.py --both --num_samples 50
    python step3_steer_performance_verification.py --score_responses responses.jsonl --ifeval_path input_data.jsonl

Sets: delta-sensitive (step 1's High Impact neurons), random and high-variance sets of the same
size; factor: --factor, else step 2's High Impact factor (confirmed, or marked unconfirmed); the
summary's first line says which and why. The modes keep the original study's names:
--combined amplifies each set by the factor at the layer, --cluster_ablation ablates each set,
--layer_ablation amplifies the delta-sensitive set by the factor at each of --layers (an
amplification, despite its name), --both runs cluster and layer ablation. Every configuration is
compared with the baseline on the same prompts (the summary gives the smallest Δ they can detect)
and Pile documents (each perplexity change with a per-document bootstrap 95% CI).
"""

from __future__ import annotations

import argparse

import delta_steering as ds
from delta_steering.artifacts import STEP2_DEFAULTS
from delta_steering.cli import add_model_args, add_pile_args, add_run_args, add_step1_file_args, step_parser
from delta_steering.options import IFEVAL_METRICS, MODES, VerifyOptions
from delta_steering.steps.script import step_main


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("--num_samples", type=int, default=VerifyOptions.num_samples, help="the first N IFEval prompts")
    parser.add_argument("--output_dir", default="cluster_ablation_ifeval_results",
                        help="results, responses, plots and the resume checkpoint")
    modes = parser.add_argument_group("modes (--combined when none is given)")
    modes.add_argument("--combined", action="store_true", help="each set amplified by the factor at the layer")
    modes.add_argument("--cluster_ablation", action="store_true",
                       help="each set ablated at the layer (as step 1 ablated single neurons)")
    modes.add_argument("--layer_ablation", action="store_true",
                       help="the delta-sensitive set amplified by the factor at each of --layers (the original "
                            "study's name; nothing is ablated)")
    modes.add_argument("--both", action="store_true", help="--cluster_ablation and --layer_ablation, not --combined")
    add_step1_file_args(parser, "step files")
    parser.add_argument("--factors_file", default=None, help=f"step-2 JSON (default: {STEP2_DEFAULTS[0]})")
    parser.add_argument("--factor", type=float, default=None, help="steering factor (default: the step-2 file's)")
    parser.add_argument("--layers", default=None,
                        help="layers for --layer_ablation (default: the 5 SSM layers centred on the layer, "
                             "18-22 for layer 20 of a 24-layer model)")
    parser.add_argument("--ifeval_path", default=None, help="local IFEval JSONL (default: google/IFEval on the Hub)")
    parser.add_argument("--ifeval_metric", default=VerifyOptions.ifeval_metric, choices=list(IFEVAL_METRICS),
                        help="the metric reported as Accuracy")
    parser.add_argument("--max_new_tokens", type=int, default=VerifyOptions.max_new_tokens,
                        help="generation length limit per prompt")
    add_pile_args(parser)
    parser.add_argument("--score_responses", default=None, metavar="FILE",
                        help='score a JSONL of {"prompt", "response"}; no model is loaded')
    add_run_args(parser)
    return parser


def chosen_modes(args: argparse.Namespace) -> list[str]:
    """The modes the flags ask for, in the original study's order (--combined when none)."""
    if args.both:
        return ["cluster_ablation", "layer_ablation"]
    return [mode for mode in MODES if getattr(args, mode)] or ["combined"]


def score_file(args: argparse.Namespace) -> bool:
    """--score_responses: score a response file instead of running step 3 (no model is loaded)."""
    if args.score_responses:
        path = ds.steps.verify.score_response_file(args.score_responses, args.ifeval_path, args.output_dir)
        print(f"results: {path}")
    return bool(args.score_responses)


main = step_main(build_parser, VerifyOptions, "verify", values=lambda args: {"modes": chosen_modes(args)},
                 instead=score_file)


if __name__ == "__main__":
    main()
