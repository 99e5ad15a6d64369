"""What the model's identity costs: the fingerprint of its weights (`ModelSource.digest`: safetensors
headers plus 16 blocks of 4 KiB of each tensor) against the SHA-256 of every byte of the weight file
(the strongest simple alternative) and the configuration's digest alone (the identity before, which
reads no weight), on a model of mamba-790m's shape (random weights, 3.2 GB in float32) saved once
as safetensors to a temporary folder.

    python benchmarks/bench_fingerprint.py
    python benchmarks/bench_fingerprint.py --size 130m --repeats 5

Each is timed with the file in the OS page cache ("hot") and after asking the OS to drop the file's
pages (posix_fadvise DONTNEED: "cold"; on a virtual disk the host may still cache it). The last
lines estimate a 7B checkpoint (falcon-mamba-7b's shape in bfloat16, its tensors counted on a
weightless model): the sampled fingerprint at the cold cost per tensor measured here, every byte at
the cold throughput measured here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import MambaConfig
from workload import SHARED_DATA, model_shaped

from delta_steering.model import loading
from delta_steering.model.sites import meta_model
from delta_steering.results_io import file_digest

FALCON_MAMBA_7B = dict(vocab_size=65024, hidden_size=4096, num_hidden_layers=64, state_size=16, expand=2,
                       conv_kernel=4, time_step_rank=256, tie_word_embeddings=False)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="790m", choices=["130m", "790m"], help="the model's shape")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the median is shown)")
    return parser.parse_args()


def drop_cache(path: Path) -> None:
    """Ask the OS to forget the file's cached pages, so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def median_seconds(fn, repeats: int, before=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_fingerprint_"))
    try:
        model = model_shaped("mamba", torch.float32, "cpu", seed=0, size=args.size)
        model.save_pretrained(folder)
        del model
        weights = folder / "model.safetensors"
        size = weights.stat().st_size
        tensors = len(loading.safetensors_tensors(weights))
        sampled = sum(length for _, t in loading.safetensors_tensors(weights)
                      for _, length in loading.fingerprint_spans(t.nbytes, whole=False))
        print(f"model: mamba-{args.size}'s shape, float32, {size / 1e9:.2f} GB in one safetensors file, {tensors} "
              f"tensors; the fingerprint reads {sampled / 2**20:.1f} MiB of them")

        tokenizer = str(SHARED_DATA / "tokenizers" / "gpt-neox-20b")  # not loaded: the folder has weights only

        def fingerprint():
            return loading.check_model_source(str(folder), tokenizer).digest

        def config_only():
            source = loading.check_model_source(str(folder), tokenizer)
            return loading.config_digest(source.model_config, source.structure)

        cold = lambda: drop_cache(weights)  # noqa: E731
        times = {
            "config digest only (reads no weight)": median_seconds(config_only, args.repeats),
            "fingerprint, hot": median_seconds(fingerprint, args.repeats),
            "fingerprint, cold": median_seconds(fingerprint, args.repeats, cold),
            "SHA-256 of every byte, hot": median_seconds(lambda: file_digest(weights), args.repeats),
            "SHA-256 of every byte, cold": median_seconds(lambda: file_digest(weights), args.repeats, cold),
        }
        for name, seconds in times.items():
            print(f"  {name:<38} {seconds:8.3f} s")
        extra = times["fingerprint, cold"] - times["config digest only (reads no weight)"]
        print(f"every byte / fingerprint (cold): {times['SHA-256 of every byte, cold'] / times['fingerprint, cold']:.1f}x")

        big = meta_model(MambaConfig(**FALCON_MAMBA_7B))
        big_tensors = len(list(big.state_dict()))
        big_bytes = sum(p.numel() for p in big.state_dict().values()) * 2  # bfloat16
        per_tensor = max(extra, 0.0) / tensors
        throughput = size / times["SHA-256 of every byte, cold"]
        print(f"7B estimate (falcon-mamba-7b's shape, {big_tensors} tensors, {big_bytes / 1e9:.1f} GB in bfloat16): "
              f"fingerprint {per_tensor * big_tensors:.2f} s beyond the config digest ({per_tensor * 1e3:.2f} ms a "
              f"tensor, cold), every byte {big_bytes / throughput:.0f} s (at {throughput / 1e9:.2f} GB/s, cold)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
