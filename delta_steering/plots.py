"""Figures for the three steps (matplotlib, headless). Each function writes PNGs and returns their paths."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_discovery(result: dict, output_dir: str | Path) -> list[Path]:
    """Step 1: ranked impacts with CI whiskers, impact histogram with the ±2 thresholds, variance vs impact."""
    out = Path(output_dir)
    records = [r for r in result["all_neuron_impacts"] if r["impact"] is not None]
    impact = np.array([r["impact"] for r in records])
    ci = np.array([r["ci95"] if r["ci95"] else [r["impact"]] * 2 for r in records])
    layer = result["layer"]

    fig, ax = plt.subplots(figsize=(10, 4))
    rank = np.arange(len(records))
    ax.errorbar(rank, impact, yerr=[impact - ci[:, 0], ci[:, 1] - impact], fmt=".", ms=3, lw=0.6,
                ecolor="0.7", color="C0")
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(result["threshold"], color="C3", ls="--", lw=0.8, label=f"threshold {result['threshold']}")
    ax.set(xlabel="neuron rank", ylabel="impact (baseline - ablated, points)",
           title=f"Delta neuron ablation impact, layer {layer} (95% CI)")
    ax.legend()
    paths = [_save(fig, out / f"impact_ranked_L{layer}.png")]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(impact, bins=min(50, max(5, len(impact) // 4)), color="C0")
    for x in (-2, 2):
        ax.axvline(x, color="C3", ls="--", lw=0.8)
    ax.set(xlabel="impact (points)", ylabel="neurons", title=f"Impact distribution, layer {layer}")
    paths.append(_save(fig, out / f"impact_histogram_L{layer}.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    variance = np.array([r["delta_variance"] for r in records])
    ax.scatter(variance, impact, s=8)
    ax.set(xscale="log" if (variance > 0).all() else "linear", xlabel="delta variance (Pile)",
           ylabel="impact (points)", title=f"Delta variance vs impact, layer {layer}")
    paths.append(_save(fig, out / f"variance_vs_impact_L{layer}.png"))
    return paths
