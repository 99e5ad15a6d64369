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


def plot_factors(result: dict, output_dir: str | Path) -> list[Path]:
    """Step 2: accuracy vs factor per group (CI band, baseline), step-1 vs held-out impacts, perplexity by layer."""
    out, paths = Path(output_dir), []
    base = result["selection_baseline_accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (name, group) in enumerate(result["groups"].items()):
        rows = [r for r in group["results"] if r["accuracy"] is not None and r["ci95"] is not None]
        if not rows:
            continue
        f = np.array([r["factor"] for r in rows])
        acc = np.array([r["accuracy"] for r in rows])
        ci = np.array([r["ci95"] for r in rows])
        ax.plot(f, acc, "o-", color=f"C{k}", label=f"{name} (n={len(group['neurons'])})")
        ax.fill_between(f, base + ci[:, 0], base + ci[:, 1], color=f"C{k}", alpha=0.2)
    ax.axhline(base, color="k", ls="--", lw=0.8, label="baseline")
    ax.set(xscale="log", xlabel="steering factor", ylabel="selection-half accuracy (%)",
           title=f"Group amplification at layer {result['layer']} (95% CI of the change)")
    ax.legend()
    paths.append(_save(fig, out / "accuracy_vs_factor.png"))

    ranking = [r for r in result["importance_ranking"]["neurons"]
               if r["impact"] is not None and r["step1_impact"] is not None]
    if ranking:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter([r["step1_impact"] for r in ranking], [r["impact"] for r in ranking], s=10)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.axvline(0, color="0.6", lw=0.6)
        rho = result["importance_ranking"]["spearman_step1_vs_heldout"]
        ax.set(xlabel="step-1 impact (discovery)", ylabel="step-2 impact (held-out)",
               title="Does the discovery replicate?" + ("" if rho is None else f"  Spearman {rho:.2f}"))
        paths.append(_save(fig, out / "step1_vs_heldout_impact.png"))

    if result.get("perplexity"):
        ppl = result["perplexity"]
        layers = [e["layer"] for e in ppl["layers"]]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(layers, [e["ablated"] for e in ppl["layers"]], "o-", label="ablated")
        if ppl["factor"] is not None:
            ax.plot(layers, [e["amplified"] for e in ppl["layers"]], "s-", label=f"amplified x{ppl['factor']:g}")
        ax.axhline(ppl["baseline"], color="k", ls="--", lw=0.8, label="baseline")
        ax.set(xlabel="layer", ylabel="Pile perplexity", title="High Impact neurons steered at each layer")
        ax.legend()
        paths.append(_save(fig, out / "perplexity_vs_layer.png"))
    return paths


def plot_verification(results: dict, output_dir: str | Path) -> list[Path]:
    """Step 3: configurations side by side (accuracy with CI, perplexity); accuracy and perplexity vs layer."""
    out, paths = Path(output_dir), []
    for mode, result in results.items():
        entries = result["configurations"]
        names = [e["name"] for e in entries]
        base = entries[0]["accuracy"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        x = np.arange(len(entries))
        err = np.array([[e["accuracy"] - (base + e["ci95"][0]), base + e["ci95"][1] - e["accuracy"]]
                        for e in entries]).T.clip(min=0)
        ax1.bar(x, [e["accuracy"] for e in entries], yerr=err, color=["0.6"] + ["C0"] * (len(entries) - 1))
        ax1.set(xticks=x, ylabel=f"IFEval {result['ifeval_metric']} (%)", title=f"{mode}: accuracy")
        ax1.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ppl = [e["perplexity"] if e["perplexity"] is not None else np.nan for e in entries]
        ax2.bar(x, ppl, color=["0.6"] + ["C1"] * (len(entries) - 1))
        ax2.set(xticks=x, ylabel="Pile perplexity", title=f"{mode}: perplexity")
        ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        paths.append(_save(fig, out / f"{mode}_configurations.png"))
        if mode == "layer_ablation":
            steered = entries[1:]
            layers = [e["layer"] for e in steered]
            fig, ax1 = plt.subplots(figsize=(7, 4))
            ax1.plot(layers, [e["accuracy"] for e in steered], "o-", color="C0", label="accuracy")
            ax1.axhline(base, color="C0", ls="--", lw=0.8)
            ax1.set(xlabel="layer", ylabel=f"IFEval {result['ifeval_metric']} (%)",
                    title=f"Delta-sensitive steering x{result['factor']:g} by layer (dashed: baseline)")
            ax2 = ax1.twinx()
            ax2.plot(layers, [e["perplexity"] for e in steered], "s-", color="C1", label="perplexity")
            ax2.axhline(entries[0]["perplexity"], color="C1", ls="--", lw=0.8)
            ax2.set_ylabel("Pile perplexity")
            paths.append(_save(fig, out / "layer_ablation_vs_layer.png"))
    return paths
