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
from pathlib import Path

import delta_steering as ds
from delta_steering.cli import (add_pile_args, add_placement_args, add_source_args, add_steering_args,
                                check_output_dir, main_guard, parse_steer, step_parser)

DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    parser = step_parser(__doc__)
    add_source_args(parser)
    add_placement_args(parser, device="cpu")
    add_steering_args(parser)
    parser.add_argument("--ablation", default="zero", choices=["zero", "mean"],
                        help="what factor 0 does: zero: dt_pre set to 0; mean: set to its mean over the statistics "
                             "documents (--pile_path)")
    add_pile_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds Pile sampling (mean ablation)")
    parser.add_argument("--out", required=True, help="the checkpoint directory to write (new or empty)")
    return parser


def parse_args() -> tuple[argparse.Namespace, list]:
    """The arguments and the --steer steerings, checked: everything that can be wrong without the
    model fails here."""
    args = build_parser().parse_args()
    if bool(args.steer) == bool(args.from_step2):
        raise ds.UsageError("give --steer LAYER:NEURONS:FACTOR (one or more) or --from_step2 FILE")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ds.UsageError(f"--out {out} exists and is not an empty folder: choose a new one")
    check_output_dir(out, "--out")
    return args, [parse_steer(text) for text in args.steer]


def source_directory(source) -> Path:
    """The checkpoint's files on disk: a local directory, or the Hub snapshot (downloaded into the cache)."""
    if source.original:
        raise ds.UsageError(f"{source.name} is in mamba_ssm's original format; export starts from a transformers "
                            "checkpoint (e.g. state-spaces/mamba-130m-hf)")
    if source.local:
        return Path(source.path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source.path, revision=source.revision, allow_patterns=["*.json", "*.safetensors"]))


def stored_dtype(directory: Path) -> str:
    """The dtype the weights are stored in (that of the first floating tensor), to load them unchanged."""
    from safetensors import safe_open

    with safe_open(ds.model.export.weight_files(directory)[0], framework="pt") as f:
        for key in f.keys():
            dtype = f.get_slice(key).get_dtype()
            if dtype in DTYPES:
                return DTYPES[dtype]
    return "float32"


def mean_ablated(args, model, tokenizer, steerings: list) -> tuple[list, dict]:
    """Factor-0 neurons set to their mean dt_pre over the statistics documents instead."""
    zeroed = sorted({s.layer for s in steerings if s.intervention.kind == "scale" and 0.0 in s.intervention.factors})
    if not zeroed:
        raise ds.UsageError("--ablation mean applies to neurons steered by factor 0; no --steer has factor 0")
    texts = ds.data.pile.load_pile_texts(args.pile_samples, args.seed, args.pile_path, role="statistics")
    stats = ds.model.delta_stats.layer_delta_statistics(model, tokenizer, texts, zeroed)
    out = []
    for steering in steerings:
        pairs = list(zip(steering.neurons, steering.intervention.factors or ()))
        ablated = [n for n, f in pairs if f == 0.0]
        if steering.layer not in zeroed or not ablated:
            out.append(steering)
            continue
        means = [float(v) for v in stats[steering.layer]["dt_pre_mean"]]
        out.append(ds.Steering(steering.layer, ds.Intervention.ablation("mean", ablated, means)))
        kept = [(n, f) for n, f in pairs if f != 0.0]
        if kept:
            out.append(ds.Steering(steering.layer, ds.Intervention.scale(*zip(*kept))))
    return out, {"documents": ds.data.pile.pile_record(texts, "statistics")}


@main_guard
def main() -> None:
    args, steerings = parse_args()
    source = ds.model.loading.check_model_source(args.model, args.tokenizer)
    inputs, extra = {}, {}
    if args.from_step2:
        step2 = ds.artifacts.step2_steering(args.from_step2, source)
        print("\n".join(step2.notes))
        steerings, inputs["step2_file"], extra["factor_source"] = [step2.steering], step2.factors, step2.factor_source
    for steering in steerings:
        ds.model.sites.check_layer(source.shape, steering.layer, "--steer layer")
        ds.model.sites.check_neurons(source.shape, steering.neurons, "--steer")
    directory = source_directory(source)
    model, tokenizer = ds.model.loading.load_model(source, args.device, stored_dtype(directory), args.max_memory,
                                                   args.offload_folder)
    if args.ablation == "mean":
        steerings, extra["mean_ablation"] = mean_ablated(args, model, tokenizer, steerings)
    ds.model.steering.verify_steering_effect(model, steerings)
    layers = {s.layer for s in steerings}
    provenance = ds.artifacts.Provenance.of(source, layers.pop() if len(layers) == 1 else None, inputs)
    ds.model.export.export_steered(model, tokenizer, directory, args.model, steerings, Path(args.out),
                             provenance=provenance.to_json(), **extra)
    print(f"steered checkpoint: {args.out} ({'; '.join(s.describe() for s in steerings)}); "
          f"undo and provenance in {Path(args.out) / ds.model.export.STEERING_FILE}")


if __name__ == "__main__":
    main()
