"""Load a selective-SSM language model (Mamba-1, Mamba-2 or a hybrid) and its tokenizer from a local
directory or a Hub id.

    python mamba_model_loader.py state-spaces/mamba-130m-hf --device cpu
    python mamba_model_loader.py state-spaces/mamba2-130m --device cpu
    python mamba_model_loader.py models/mamba-tiny-demo

Prints the model's summary (family, SSM layers, delta neurons per layer, parameters, SSM backend), or one line
saying what is wrong. The loading itself is `delta_steering.model.loading` (`load_mamba_model`, `describe`),
which this module also exposes: `from mamba_model_loader import load_mamba_model`.
"""

from __future__ import annotations

import argparse

import delta_steering as ds
from delta_steering.cli import add_placement_args, main_guard


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="local checkpoint directory or Hub id")
    add_placement_args(parser)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weight dtype (default: %(default)s)")
    parser.add_argument("--revision", default=None, help="Hub revision (default: the latest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: the model's)")
    return parser.parse_args()


@main_guard
def main() -> None:
    args = parse_args()
    model, _ = ds.model.loading.load_mamba_model(args.model, args.device, args.dtype, args.revision, args.tokenizer,
                                                 args.max_memory, args.offload_folder)
    for key, value in ds.model.loading.describe(model).items():
        print(f"{key:>24}: {value}")


def __getattr__(name: str):
    """The names of delta_steering.model.loading (load_mamba_model, describe, ...), imported on first use so
    that --help needs no torch."""
    return getattr(ds.model.loading, name)


if __name__ == "__main__":
    main()
