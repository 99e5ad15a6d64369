"""Pile documents for delta statistics and perplexity.

    python pile_dataset_loader.py --num_samples 5
    python pile_dataset_loader.py --num_samples 5 --pile_path ../shared/data/pile/pile_text.jsonl

From the Hub: monology/pile-uncopyrighted (streaming), then NeelNanda/pile-10k, then EleutherAI/pile.
Locally (`--pile_path`): .jsonl / .jsonl.zst with a "text" field, .txt (one document per block
separated by blank lines), .parquet, or a folder of such files. The same seed gives the same
documents. The loading itself is `delta_steering.data.pile` (`load_pile_texts`), which this module also
exposes.
"""

from __future__ import annotations

import argparse

import delta_steering as ds
from delta_steering.cli import main_guard
from delta_steering.options import check_positive


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=5, help="documents to load (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: %(default)s)")
    parser.add_argument("--pile_path", default=None, help="local file or folder (default: the Hub)")
    parser.add_argument("--split", default="validation", help="Hub split (default: %(default)s)")
    return parser.parse_args()


@main_guard
def main() -> None:
    args = parse_args()
    check_positive(args.num_samples, "--num_samples")
    check_positive(args.seed, "--seed", least=0)
    texts = ds.data.pile.load_pile_texts(args.num_samples, args.seed, args.pile_path, args.split)
    print(f"{len(texts)} documents, {sum(len(t) for t in texts)} characters")
    for i, text in enumerate(texts):
        preview = text[:100].replace("\n", " ")
        print(f"[{i}] {len(text):>7} chars  {preview}")


def __getattr__(name: str):
    """The names of delta_steering.data.pile (load_pile_texts, HUB_SOURCES, ...), imported on first use."""
    return getattr(ds.data.pile, name)


if __name__ == "__main__":
    main()
