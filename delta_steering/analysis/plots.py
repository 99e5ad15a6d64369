"""Figures for the three steps. Each `*_figure` function builds one matplotlib Figure from a step's
result dict; `plot_discovery`, `plot_factors` and `plot_verification` write them as PNG (150 dpi)
and SVG (same stem, for papers) and return the paths written.

Every figure's title says what was measured, on which model, layer and examples; its axes carry
units. The figures are `matplotlib.figure.Figure` objects, not pyplot's: they render headless (Agg
for PNG), leave the global backend alone, hold no pyplot state and need no closing.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator, ScalarFormatter

from ..artifacts import GROUP_TITLES, HIGH_IMPACT, measured_finite
from ..results_io import WriteError
from .verification import factor_source_text, layer_span
from .stats import SIGNIFICANCE, is_significant

STYLE = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "figure.titlesize": 11,
         "legend.fontsize": 8.5, "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.spines.top": False,
         "axes.spines.right": False}
# tab10 colours (colour-blind-safe pairs), told apart by marker or line style as well
PLAIN, SIGNIFICANT, BASELINE, GRID = "C0", "C1", "0.35", "0.85"
HIGH_LINE = {"color": "C2", "ls": "--", "lw": 1.3}
ESTIMATE_ALPHA = 0.35  # an estimate, drawn faded under the exact impacts
THRESHOLD_LINE = {"color": "C4", "ls": ":", "lw": 1.6}
IMPACT_LABEL = "impact = baseline − ablated accuracy (points)"
PERPLEXITY_LABEL = "Pile perplexity: change from baseline (%)"
TOP_LABELLED = 10
METRIC_NAMES = {"prompt_level_strict_acc": "IFEval prompt-level strict accuracy",
                "inst_level_strict_acc": "IFEval instruction-level strict accuracy",
                "prompt_level_loose_acc": "IFEval prompt-level loose accuracy",
                "inst_level_loose_acc": "IFEval instruction-level loose accuracy"}
MODE_TITLES = {"combined": "combined steering", "cluster_ablation": "cluster ablation",
               "layer_ablation": "layer ablation (amplification at each layer)"}  # results without mode_title


# --- shared helpers -----------------------------------------------------------------------------

styled = matplotlib.rc_context(STYLE)  # decorator: a figure function builds its figure under STYLE


def _new(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure and its axes (always an array)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    for ax in axes.flat:
        ax.grid(True, color=GRID, lw=0.6)
        ax.set_axisbelow(True)
    return fig, axes.ravel()


def _title(fig: Figure, what: str, details: str) -> None:
    """The figure title: what was measured on what, then a wrapped line of details."""
    width = int(fig.get_figwidth() * 12)
    fig.suptitle(_fill(what, width) + "\n" + _fill(details, width))


def _fill(text: str, width: int) -> str:
    """`text` wrapped at spaces (never at hyphens) to `width` characters."""
    return textwrap.fill(text, width, break_on_hyphens=False)


def _wrap(text: str, ax) -> str:
    """`text` wrapped to the width of the axes `ax` (for panel titles)."""
    return _fill(text, int(ax.get_position().width * ax.figure.get_figwidth() * 15))


def _model(result: dict) -> str:
    """The model's name, a long local path shortened to its last two parts."""
    parts = str(result.get("model") or "unknown model").rstrip("/").split("/")
    return "/".join(parts[-2:])


def _minus(text: str) -> str:
    """`text` with true minus signs (for numbers written into labels)."""
    return text.replace("-", "−")


def _times(factor: float | None) -> str:
    """' ×k' for a factor, '' for none."""
    return "" if factor is None else f" ×{factor:g}"


def _empty(ax, message: str) -> None:
    """A panel with nothing to plot says why (and shows no meaningless y ticks)."""
    ax.set_yticks([])
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color=BASELINE)


def _legend(ax, **kw) -> None:
    """A legend when the axes has labelled artists."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(framealpha=0.9, **kw)


def _plain(ax) -> None:
    """Plain y tick numbers: no offset and no ×10ⁿ multiplier above the axis."""
    ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    ax.ticklabel_format(axis="y", style="plain")


def _relative_changes(changes: list[dict | None]) -> tuple[np.ndarray, np.ndarray]:
    """Perplexity changes in percent of the baseline and their error bars (2 x n, from the 95% CIs);
    NaN where not measured or not finite."""
    known = [c if c and c.get("relative") is not None else None for c in changes]
    values = np.array([np.nan if c is None else c["relative"] for c in known], dtype=float)
    ci = np.array([[np.nan, np.nan] if c is None else c["relative_ci95"] for c in known], dtype=float).reshape(-1, 2)
    return values, _error_bars(values, ci)


def _cis(rows: list[dict], key: str) -> np.ndarray:
    """The rows' 95% CIs (n x 2); a row without one gets the point `row[key]` itself."""
    return np.array([r.get("ci95") or [r[key]] * 2 for r in rows], dtype=float).reshape(-1, 2)


def _error_bars(values: np.ndarray, ci: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """matplotlib's error bars (2 x n) for `values` from their CIs (n x 2), the CIs shifted by `offset`
    (a change's CI drawn around a baseline's level)."""
    return np.clip([values - (offset + ci[:, 0]), offset + ci[:, 1] - values], 0, None)


def _step3_changes(entries: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Step 3's perplexity changes (percent) and error bars, per configuration."""
    return _relative_changes([{"relative": e.get("perplexity_relative"), "relative_ci95": e.get(
        "perplexity_relative_ci95")} for e in entries])


def _save(fig: Figure, out: Path, stem: str) -> list[Path]:
    """Write `fig` as OUT/STEM.png (150 dpi) and OUT/STEM.svg; return both paths. A file that
    cannot be written is a WriteError naming it, as for the JSON results."""
    png, svg = out / f"{stem}.png", out / f"{stem}.svg"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=150)
        with matplotlib.rc_context({"svg.hashsalt": "delta-steering"}):  # reproducible SVG ids
            fig.savefig(svg, metadata={"Date": None})
    except OSError as e:
        raise WriteError(f"could not write the figure {out / stem}.png/.svg ({e.strerror or e})") from None
    finally:
        fig.clear()
    return [png, svg]


# --- step 1 ----------------------------------------------------------------------------------

def _measured(result: dict) -> list[dict]:
    """Step 1's measured records with a finite impact, largest impact first."""
    return sorted(measured_finite(result["all_neuron_impacts"]), key=lambda r: (-r["impact"], r["neuron"]))


def _step1_details(result: dict) -> str:
    """Step 1's title details: examples, ablation, how many neurons were measured."""
    counts = result.get("num_examples") or {}
    sizes = set(counts.values())
    split = f"{len(counts)} tasks × {sizes.pop()}" if len(sizes) == 1 else f"{len(counts)} tasks"
    records = result["all_neuron_impacts"]
    measured = sum(bool(r.get("measured", True)) for r in records)
    shown = len(_measured(result))
    neurons = (f"all {len(records)} neurons measured" if measured == len(records) else
               f"{measured} of {len(records)} neurons measured ({len(records) - measured} screened out by "
               f"attribution, not shown)")
    if shown < measured:
        neurons += f"; {measured - shown} with non-finite logits not shown"
    return (f"{result.get('ablation', 'zero')} ablation, {sum(counts.values())} discovery examples ({split}); "
            f"{neurons}")


def _cut(result: dict) -> float:
    """The High Impact cut (points) the step-1 run grouped with."""
    return result.get("high_impact_cut", HIGH_IMPACT)


def _threshold_lines(ax, result: dict, vertical: bool = False) -> None:
    """The High Impact cut (impact > cut) and the beneficial threshold, as labelled lines."""
    line = ax.axvline if vertical else ax.axhline
    line(_cut(result), **HIGH_LINE, label=f"High Impact cut: impact > {_cut(result):g}")
    line(result["threshold"], **THRESHOLD_LINE,
         label=_minus(f"beneficial threshold: impact ≥ {result['threshold']:g}"))


def _impact_points(ax, x: np.ndarray, records: list[dict]) -> None:
    """Impacts at `x` with their 95% CI, significant neurons (BH q < 0.05) marked apart."""
    impact = np.array([r["impact"] for r in records], dtype=float)
    ax.errorbar(x, impact, yerr=_error_bars(impact, _cis(records, "impact")), fmt="none", ecolor="0.6", elinewidth=0.8, label="95% CI (bootstrap)")
    significant = np.array([is_significant(r.get("q_value")) for r in records], dtype=bool)
    ax.scatter(x[~significant], impact[~significant], s=16, color=PLAIN, zorder=3,
               label=f"not significant ({(~significant).sum()})")
    ax.scatter(x[significant], impact[significant], s=34, marker="D", color=SIGNIFICANT, edgecolor="k",
               linewidth=0.5, zorder=4, label=f"significant, BH q < {SIGNIFICANCE:g} ({significant.sum()})")


def _label_neurons(ax, x, y, neurons, rotate: bool = False, beside: bool = False) -> None:
    """Neuron IDs written just above (or right of) the points (x, y)."""
    offset, align = ((6, 0), {"ha": "left", "va": "center"}) if beside else (
        (0, 3), {"ha": "center", "va": "bottom"})
    for xi, yi, neuron in zip(x, y, neurons):
        ax.annotate(str(neuron), (xi, yi), xytext=offset, textcoords="offset points", fontsize=8,
                    rotation=90 if rotate else 0, **align)


def _step1_figure(result: dict, size: tuple[float, float], what: str, xlabel: str, ylabel: str,
                  details: str = "") -> tuple[Figure, Any, list[dict]]:
    """A step-1 figure's frame (title, axis labels) and the measured records; none: the axes say so."""
    records = _measured(result)
    fig, (ax,) = _new(*size)
    _title(fig, f"Step 1: {what}, {_model(result)}, layer {result['layer']}", _step1_details(result) + details)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if not records:
        _empty(ax, "no neuron was measured")
    return fig, ax, records


@styled
def impact_ranked_figure(result: dict) -> Figure:
    """Step 1: every measured neuron's impact by rank, with CI, significance, thresholds and top IDs."""
    labelled = min(TOP_LABELLED, len(_measured(result)))
    fig, ax, records = _step1_figure(result, (10, 5), "single-neuron ablation impact", "neuron rank by impact",
                                     IMPACT_LABEL, f"; labels: IDs of the top {labelled} neurons")
    if not records:
        return fig
    rank = np.arange(1, len(records) + 1)
    _impact_points(ax, rank, records)
    top = records[:TOP_LABELLED]
    tops = [max(r["impact"], (r.get("ci95") or [0, r["impact"]])[1]) for r in top]
    _label_neurons(ax, rank[:len(top)], tops, [r["neuron"] for r in top], rotate=len(records) > 30)
    if len(records) > 100:
        ax.set(xscale="log", xlabel="neuron rank by impact (log scale)")
    ax.axhline(0, color="0.2", lw=0.7)
    _threshold_lines(ax, result)
    ax.margins(y=0.12)
    _legend(ax, loc="upper right")
    return fig


@styled
def impact_histogram_figure(result: dict) -> Figure:
    """Step 1: how many neurons have each impact, by group, with the two thresholds."""
    fig, ax, records = _step1_figure(result, (7, 4.8), "distribution of single-neuron impacts", IMPACT_LABEL,
                                     "neurons (count)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not records:
        return fig
    impact, cut = np.array([r["impact"] for r in records]), _cut(result)
    edges = np.histogram_bin_edges(impact, bins=min(50, max(8, len(impact) // 4)))
    classes = [(impact > cut, SIGNIFICANT, f"High Impact (> {cut:g})"),
               (np.abs(impact) <= cut, PLAIN, f"Neutral (|impact| ≤ {cut:g})"),
               (impact < -cut, "C7", f"impact < −{cut:g}")]
    shown = [(impact[mask], color, f"{label}: {mask.sum()}") for mask, color, label in classes if mask.any()]
    ax.hist([s[0] for s in shown], bins=edges, stacked=True, color=[s[1] for s in shown],
            label=[s[2] for s in shown], edgecolor="white", linewidth=0.5)
    _threshold_lines(ax, result, vertical=True)
    _legend(ax, loc="upper right")
    return fig


@styled
def variance_vs_impact_figure(result: dict) -> Figure:
    """Step 1: each measured neuron's delta variance on the Pile against its impact."""
    tokens = result.get("delta_statistics_tokens")
    fig, ax, records = _step1_figure(result, (9, 5), "delta variance vs ablation impact",
                                     "variance of Δ = softplus(dt_pre) over Pile tokens (unitless)", IMPACT_LABEL,
                                     f"; Δ statistics over {tokens} Pile tokens" if tokens else "")
    if not records:
        return fig
    variance = np.array([r["delta_variance"] for r in records], dtype=float)
    _impact_points(ax, variance, records)
    if (variance > 0).all():
        ax.set(xscale="log", xlabel=ax.get_xlabel() + ", log scale")
    high = [r for r in records if r["impact"] > _cut(result)][:TOP_LABELLED]
    _label_neurons(ax, [r["delta_variance"] for r in high], [r["impact"] for r in high],
                   [r["neuron"] for r in high], beside=True)
    ax.axhline(0, color="0.2", lw=0.7)
    _threshold_lines(ax, result)
    ax.margins(y=0.12)
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def plot_discovery(result: dict, output_dir: str | Path) -> list[Path]:
    """Step 1's figures (ranked impacts, histogram, variance vs impact) as PNG and SVG."""
    out, layer = Path(output_dir), result["layer"]
    return [*_save(impact_ranked_figure(result), out, f"impact_ranked_L{layer}"),
            *_save(impact_histogram_figure(result), out, f"impact_histogram_L{layer}"),
            *_save(variance_vs_impact_figure(result), out, f"variance_vs_impact_L{layer}")]


# --- step 2 ----------------------------------------------------------------------------------

def _heldout_count(result: dict) -> int | None:
    """How many held-out examples step 2 used (selection + confirmation halves)."""
    if "selection_examples" in result:
        return len(result["selection_examples"]) + len(result.get("confirmation_examples", []))
    group = next(iter(result["groups"].values()), None)
    return group["selection_size"] + group["confirmation_size"] if group else None


def _factor_axis(ax, factors) -> None:
    """A log factor axis ticked at exactly the factors used."""
    ax.set_xscale("log")
    ax.set_xticks(factors, labels=[f"{f:g}" for f in factors])
    ax.xaxis.set_minor_locator(NullLocator())


def _verdict(optimal: dict | None) -> str:
    """One group's outcome in words: its confirmed or unconfirmed optimum, or no factor."""
    if optimal is None:
        return "no factor could be scored"
    if not optimal["beats_baseline"]:
        return _minus(f"no factor beats the baseline (best: ×{optimal['selection_best_factor']:g}, "
                      f"{optimal['selection']['delta']:+.1f} points)")
    c = optimal.get("confirmation") or {}
    tested = "" if c.get("delta") is None or c.get("p_value") is None else _minus(
        f": Δ\u00a0{c['delta']:+.1f} points, p\u00a0=\u00a0{c['p_value']:.2g} on the confirmation half")
    return f"optimum ×{optimal['factor']:g}, " + ("confirmed" if optimal["confirmed"] else "unconfirmed") + tested


def _mark_optimum(ax, optimal: dict | None, rows: list[dict]) -> None:
    """A star at the chosen factor: filled when confirmed, hollow when not."""
    if not optimal or not optimal["beats_baseline"]:
        return
    row = next((r for r in rows if r["factor"] == optimal["factor"]), None)
    if row is None:
        return
    confirmed = optimal["confirmed"]
    ax.scatter([row["factor"]], [row["accuracy"]], s=260, marker="*", zorder=5, linewidth=1.3,
               color=SIGNIFICANT if confirmed else "none", edgecolor="k" if confirmed else SIGNIFICANT,
               label=f"optimum ×{optimal['factor']:g} ({'confirmed' if confirmed else 'unconfirmed'})")


def _group_panel(ax, name: str, group: dict, optimal: dict | None, base: float) -> None:
    """One group's selection-half accuracy by factor: line, CI band, baseline line, optimum."""
    title = GROUP_TITLES.get(name, name)
    ax.axhline(base, color=BASELINE, ls="--", lw=1, label=f"baseline, factor 1 ({base:.1f}%)")
    rows = sorted((r for r in group["results"] if r["accuracy"] is not None), key=lambda r: r["factor"])
    if not rows:
        why = "no factor could be scored" if group["neurons"] else "empty, nothing amplified"
        ax.set_title(_wrap(f"{title} group: {why}", ax))
        return
    factors = [r["factor"] for r in rows]
    ci = np.array([[base + r["ci95"][0], base + r["ci95"][1]] if r["ci95"] else [r["accuracy"]] * 2 for r in rows])
    ax.fill_between(factors, ci[:, 0], ci[:, 1], color=PLAIN, alpha=0.2, lw=0, label="95% CI of the change")
    ax.plot(factors, [r["accuracy"] for r in rows], "o-", color=PLAIN, label="selection-half accuracy")
    _mark_optimum(ax, optimal, rows)
    _factor_axis(ax, factors)
    ax.set_title(_wrap(f"{title} group ({len(group['neurons'])} neurons): {_verdict(optimal)}", ax))
    _legend(ax, loc="best")


@styled
def accuracy_vs_factor_figure(result: dict) -> Figure:
    """Step 2: each group's selection-half accuracy by steering factor, baseline, CI and optimum."""
    groups = result["groups"]
    fig, axes = _new(5.2 * max(1, len(groups)), 5, ncols=max(1, len(groups)), sharey=True)
    first = next(iter(groups.values()), {"selection_size": "?", "confirmation_size": "?"})
    _title(fig, f"Step 2: accuracy with each neuron group amplified, {_model(result)}, layer {result['layer']}",
           f"selection half: {first['selection_size']} of {_heldout_count(result)} held-out examples "
           f"({len(result.get('tasks', []))} tasks); shaded: 95% paired-bootstrap CI of the change from baseline; "
           f"the optimum is tested once on the confirmation half ({first['confirmation_size']} examples)")
    base = result["selection_baseline_accuracy"]
    for ax, (name, group) in zip(axes, groups.items()):
        _group_panel(ax, name, group, result["optimal_factors"].get(name), base)
        ax.set_xlabel("steering factor (log scale; 1 = baseline)")
    axes[0].set_ylabel("accuracy on the selection half (%)")
    return fig


@styled
def step1_vs_heldout_figure(result: dict) -> Figure:
    """Step 2: each ranked neuron's held-out impact against its step-1 impact, with y = x."""
    ranking = result["importance_ranking"]
    rows = [r for r in ranking["neurons"] if r["impact"] is not None and r["step1_impact"] is not None]
    rho = ranking.get("spearman_step1_vs_heldout")
    fig, (ax,) = _new(6.2, 6.2)
    _title(fig, f"Step 2: do step-1 impacts replicate? {_model(result)}, layer {result['layer']}",
           f"n = {len(rows)} neurons, Spearman ρ = {'n/a' if rho is None else f'{rho:.2f}'}; each neuron "
           f"ablated alone on {_heldout_count(result)} held-out examples; labels: step-1 High Impact neurons")
    ax.set(xlabel="step-1 impact, discovery examples (points)", ylabel="held-out impact (points)")
    if not rows:
        _empty(ax, "no neuron was ranked")
        return fig
    x = np.array([r["step1_impact"] for r in rows], dtype=float)
    y = np.array([r["impact"] for r in rows], dtype=float)
    ci = _cis(rows, "impact")
    ax.errorbar(x, y, yerr=_error_bars(y, ci), fmt="o", color=PLAIN, ms=5,
                ecolor="0.6", elinewidth=0.8, label="neuron (held-out 95% CI)")
    cut = _cut(result)
    low, high = min(x.min(), ci.min(), 0), max(x.max(), ci.max(), cut)
    limits = [low - 0.05 * (high - low) - 0.1, high + 0.05 * (high - low) + 0.1]
    ax.plot(limits, limits, color=BASELINE, ls="--", lw=1, label="y = x (same impact)")
    ax.axvline(cut, **HIGH_LINE, label=f"High Impact cut ({cut:g} points)")
    ax.axhline(cut, **HIGH_LINE)
    labelled = x > cut
    _label_neurons(ax, x[labelled], y[labelled], [r["neuron"] for r, h in zip(rows, labelled) if h], beside=True)
    ax.set(xlim=limits, ylim=limits, aspect="equal")
    _legend(ax, loc="upper left")
    return fig


@styled
def perplexity_vs_layer_figure(result: dict) -> Figure:
    """Step 2: Pile perplexity's relative change, with its 95% CI, with the High Impact neurons
    ablated / amplified at each layer, and the zero line (no change)."""
    ppl = result["perplexity"]
    entries, base = ppl["layers"], ppl["baseline"]
    layers = np.array([e["layer"] for e in entries])
    fig, (ax,) = _new(7.5, 4.8)
    source = factor_source_text(ppl.get("factor_source"), short=True)
    _title(fig, f"Step 2: Pile perplexity with layer {result['layer']}'s High Impact neurons steered at each "
                f"layer, {_model(result)}",
           f"{len(ppl.get('neurons', []))} neurons; {(ppl.get('documents') or {}).get('count', '?')} evaluation "
           f"documents; baseline perplexity {base:.3f}; error bars: 95% paired-bootstrap CI over documents"
           + ("" if ppl.get("factor") is None else f"; amplified ×{ppl['factor']:g} ({source})"))
    ax.axhline(0, color=BASELINE, ls="--", lw=1, label=f"no change (baseline {base:.3f})")
    kinds = [("ablated", "o-", PLAIN, "ablated (factor 0)")]
    if ppl.get("factor") is not None:
        kinds.append(("amplified", "s--", SIGNIFICANT, f"amplified ×{ppl['factor']:g}"))
    for shift, (kind, style, color, label) in zip((-0.06, 0.06), kinds):
        values, error = _relative_changes([e.get(f"{kind}_change") for e in entries])
        ax.errorbar(layers + shift, values, yerr=error, fmt=style, color=color, capsize=3, label=label)
    if result["layer"] in layers:
        ax.axvline(result["layer"], color="0.6", ls=":", lw=1, label=f"discovery layer {result['layer']}")
    ax.set(xlabel="layer steered", ylabel=PERPLEXITY_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _plain(ax)
    _legend(ax, loc="best")
    return fig


def plot_factors(result: dict, output_dir: str | Path) -> list[Path]:
    """Step 2's figures (accuracy vs factor, step 1 vs held-out, perplexity by layer) as PNG and SVG."""
    out = Path(output_dir)
    paths = _save(accuracy_vs_factor_figure(result), out, "accuracy_vs_factor")
    if any(r["impact"] is not None and r["step1_impact"] is not None for r in result["importance_ranking"]["neurons"]):
        paths += _save(step1_vs_heldout_figure(result), out, "step1_vs_heldout_impact")
    if result.get("perplexity") and result["perplexity"].get("layers"):
        paths += _save(perplexity_vs_layer_figure(result), out, "perplexity_vs_layer")
    return paths


# --- step 3 ----------------------------------------------------------------------------------

def _metric_label(result: dict) -> str:
    """The IFEval metric in words, with its unit."""
    metric = result["ifeval_metric"]
    return METRIC_NAMES.get(metric, "IFEval " + metric.replace("_", " ")) + " (%)"


def _configuration_label(entry: dict) -> str:
    """A configuration for people: 'baseline', 'ablate delta-sensitive, L20', 'random, L20'."""
    if entry.get("neuron_set") is None:
        return entry["name"]
    words = entry["neuron_set"].replace("_", "-")
    return f"{'ablate ' if entry['ablated'] else ''}{words}, L{entry['layer']}"


def _step3_header(result: dict, mode: str) -> tuple[str, str]:
    """Step 3's title: mode, model, layer and factor (with its source), then the data details."""
    steered = [e for e in result["configurations"] if e.get("factor") not in (None, 0)]
    layers = sorted({e["layer"] for e in result["configurations"] if e.get("layer") is not None})
    where = (f"layer {result['layer']}" if layers in ([], [result["layer"]]) else
             f"layer {result['layer']}'s neurons at {layer_span(layers)}")
    source = factor_source_text(result.get("factor_source"), short=True)
    factor = (f", factor\u00a0×{result['factor']:g} ({source})" if steered and result.get("factor") is not None
              else ", neuron sets ablated")
    documents = (result.get("pile_documents") or {}).get("count")
    details = (f"{_metric_label(result)[:-4]} on {result['num_prompts']} IFEval prompts (greedy)"
               + (f"; perplexity on {documents} Pile documents" if documents else "")
               + "; error bars: 95% paired-bootstrap CI of the change from baseline")
    if result.get("mode_title"):  # it says what ran: add where the neurons come from and the factor's source
        standing = f" (factor {source})" if steered and result.get("factor") is not None else ""
        neurons = f", layer {result['layer']}'s neurons" if where != f"layer {result['layer']}" else ""
        return f"Step 3: {result['mode_title']}{standing}, {_model(result)}{neurons}", details
    return f"Step 3: {MODE_TITLES.get(mode, mode)}, {_model(result)}, {where}{factor}", details


def _accuracy_bars(ax, result: dict, entries: list[dict], base: float) -> None:
    """Each configuration's accuracy with the 95% CI of its change, and the baseline line."""
    x = np.arange(len(entries))
    acc = np.array([e["accuracy"] for e in entries], dtype=float)
    ci = np.array([e["ci95"] if e["name"] != "baseline" and e.get("ci95") else [0, 0] for e in entries], dtype=float)
    error = _error_bars(acc, ci, base)
    colors = [BASELINE if e["name"] == "baseline" else PLAIN for e in entries]
    ax.bar(x, acc, yerr=error, color=colors, capsize=4, error_kw={"elinewidth": 1, "ecolor": "k"})
    ax.axhline(base, color=BASELINE, ls="--", lw=1, label=f"baseline ({base:.1f}%)")
    for xi, e, top in zip(x, entries, acc + error[1]):
        if e["name"] != "baseline" and e.get("delta") is not None:
            ax.annotate(_minus(f"{e['delta']:+.1f}"), (xi, top), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel=_metric_label(result), ylim=(0, min(110, max(10, (acc + error[1]).max() * 1.25))))
    ax.set_title("accuracy (labels: change from baseline, points)")
    _legend(ax, loc="upper left")


def _perplexity_bars(ax, entries: list[dict]) -> None:
    """Each configuration's Pile perplexity change from the baseline (percent, 95% CI), the zero
    line; 'not measured' where absent."""
    base = next((e["perplexity"] for e in entries if e["name"] == "baseline"), None)
    ax.set(ylabel=PERPLEXITY_LABEL)
    ax.set_title("perplexity" + ("" if base is None else f" (baseline {base:.3f}; bars: 95% CI over documents)"))
    ax.axhline(0, color=BASELINE, ls="--", lw=1, label="no change")
    values, error = _step3_changes(entries)
    steered = np.array([e["name"] != "baseline" for e in entries])
    if np.isnan(values[steered]).all():
        _empty(ax, "perplexity not measured")
        return
    for xi, (e, value) in enumerate(zip(entries, values)):
        if e["name"] != "baseline" and np.isnan(value):
            ax.annotate("not measured", (xi, 0), xytext=(0, 5), textcoords="offset points", rotation=90,
                        ha="center", va="bottom", fontsize=8, color=BASELINE)
    x = np.flatnonzero(steered & ~np.isnan(values))
    ax.bar(x, values[x], yerr=error[:, x], color=SIGNIFICANT, capsize=4, error_kw={"elinewidth": 1, "ecolor": "k"})
    _plain(ax)


@styled
def configurations_figure(result: dict, mode: str | None = None) -> Figure:
    """Step 3: each configuration's IFEval accuracy (95% CI, baseline) and Pile perplexity change."""
    entries = result["configurations"]
    base = next((e for e in entries if e["name"] == "baseline"), entries[0])["accuracy"]
    fig, axes = _new(max(10, 1.3 * len(entries) + 5), 5.2, ncols=2)
    _title(fig, *_step3_header(result, mode or result.get("mode", "")))
    _accuracy_bars(axes[0], result, entries, base)
    _perplexity_bars(axes[1], entries)
    labels = [_configuration_label(e) for e in entries]
    for ax in axes:
        ax.set_xticks(np.arange(len(entries)), labels=labels, rotation=25, ha="right")
        ax.set(xlabel="configuration", xlim=(-0.6, len(entries) - 0.4))
    return fig


@styled
def layer_ablation_vs_layer_figure(result: dict) -> Figure:
    """Step 3, layer mode: accuracy (95% CI) and perplexity change by the layer steered."""
    entries = result["configurations"]
    base_entry = next((e for e in entries if e["name"] == "baseline"), entries[0])
    steered = sorted((e for e in entries if e is not base_entry and e.get("layer") is not None),
                     key=lambda e: e["layer"])
    fig, (acc_ax, ppl_ax) = _new(7.5, 6.5, nrows=2, sharex=True)
    _title(fig, *_step3_header(result, "layer_ablation"))
    layers = np.array([e["layer"] for e in steered])
    acc = np.array([e["accuracy"] for e in steered], dtype=float)
    base = base_entry["accuracy"]
    acc_ax.errorbar(layers, acc, yerr=_error_bars(acc, _cis(steered, "delta"), base), fmt="o-",
                    color=PLAIN, capsize=4, label="steered" + _times(result.get("factor")))
    acc_ax.axhline(base, color=BASELINE, ls="--", lw=1, label=f"baseline ({base:.1f}%)")
    acc_ax.set(ylabel=_fill(_metric_label(result), 24))
    _legend(acc_ax, loc="best")
    changes, error = _step3_changes(steered)
    ppl_ax.axhline(0, color=BASELINE, ls="--", lw=1, label="no change")
    if np.isnan(changes).all():
        _empty(ppl_ax, "perplexity not measured")
    else:
        ppl_ax.errorbar(layers, changes, yerr=error, fmt="s-", color=SIGNIFICANT, capsize=4,
                        label="95% CI over documents")
        _legend(ppl_ax, loc="best")
    ppl_ax.set(xlabel="layer steered", ylabel="Pile perplexity:\nchange from baseline (%)")
    ppl_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _plain(ppl_ax)
    return fig


def plot_verification(results: dict, output_dir: str | Path) -> list[Path]:
    """Step 3's figures per mode (configurations; for layer ablation also by layer) as PNG and SVG."""
    out, paths = Path(output_dir), []
    for mode, result in results.items():
        paths += _save(configurations_figure(result, mode), out, f"{mode}_configurations")
        if mode == "layer_ablation" and len(result["configurations"]) > 1:
            paths += _save(layer_ablation_vs_layer_figure(result), out, "layer_ablation_vs_layer")
    return paths


# --- atlas -----------------------------------------------------------------------------------

def _atlas_details(result: dict) -> str:
    counts = result.get("num_examples") or {}
    total = result["neurons_per_layer"] * len(result["layers"])
    sample = (result.get("recall") or {}).get("sample_size", 0)
    return (f"{result.get('ablation', 'zero')} ablation, {sum(counts.values())} discovery examples "
            f"({len(counts)} tasks); all {total} neurons estimated by attribution, the top {result['verify_top']} "
            f"of each layer and {sample} at random (the recall sample) measured exactly; BH over all {total}")


def atlas_impacts(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """(layers x neurons) the estimated impacts, and the exact impacts where measured (NaN elsewhere)."""
    entries = result["layers"]
    estimated = np.array([e["estimated_impact"] for e in entries], dtype=float)
    exact = np.full_like(estimated, np.nan)
    for k, entry in enumerate(entries):
        for record in entry["verified"]:
            if record["impact"] is not None:
                exact[k, record["neuron"]] = record["impact"]
    return estimated, exact


@styled
def atlas_figure(result: dict) -> Figure:
    """The atlas: every neuron's impact by layer, the exact one where measured (solid), the estimate
    elsewhere (faded, marked as an estimate), measured and significant neurons marked; below, each
    layer's largest verified impact with its 95% CI and its count of significant neurons."""
    entries = result["layers"]
    layers = [e["layer"] for e in entries]
    fig, (top, bottom) = _new(11, 8.5, nrows=2, height_ratios=[3, 2])
    _title(fig, f"Delta atlas: single-neuron ablation across layers, {_model(result)}", _atlas_details(result))
    estimated, exact = atlas_impacts(result)
    limit = max(float(np.nanmax(np.abs(np.concatenate([estimated.ravel(), exact.ravel()])))), 1e-9)
    shown = dict(aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest",
                 extent=(-0.5, estimated.shape[1] - 0.5, len(layers) - 0.5, -0.5))
    top.imshow(estimated, alpha=ESTIMATE_ALPHA, **shown)
    image = top.imshow(np.ma.masked_invalid(exact), **shown)
    top.grid(False)
    fig.colorbar(image, ax=top, label="impact (points): measured exactly (solid), estimated (faded)")
    rows = {layer: k for k, layer in enumerate(layers)}
    measured = [(r["neuron"], rows[e["layer"]], r.get("recall_sample", False), is_significant(r["q_value"]))
                for e in entries for r in e["verified"]]
    styles = ((lambda sample, sig: sig, dict(s=36, marker="D", color=SIGNIFICANT, edgecolor="k", linewidth=0.5,
                                             label=f"significant, BH q < {SIGNIFICANCE:g}")),
              (lambda sample, sig: not sample, dict(s=14, marker="s", facecolor="none", edgecolor="k", linewidth=0.6,
                                                    label="measured exactly: the screen's top")),
              (lambda sample, sig: sample, dict(s=70, marker="o", facecolor="none", edgecolor="k", linewidth=0.8,
                                                label="measured exactly: the recall sample (random)")))  # drawn last: rings
    for chosen, style in styles:
        points = np.array([(n, k) for n, k, sample, sig in measured if chosen(sample, sig)], dtype=float)
        top.scatter(*points.reshape(-1, 2).T, zorder=3, **style)
    top.scatter([], [], marker="s", color="C0", alpha=ESTIMATE_ALPHA, label="faded: estimated by attribution only")
    top.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    top.set_xlabel("delta neuron")
    top.set_ylabel("layer")
    _legend(top, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, borderaxespad=0.0)  # above the map

    largest = [e["largest_verified"] for e in entries]
    shown = [k for k, v in enumerate(largest) if v is not None]
    if not shown:
        _empty(bottom, "no verified neuron has a finite impact")
        return fig
    impact = np.array([largest[k]["impact"] for k in shown], dtype=float)
    ci = _cis([largest[k] for k in shown], "impact")
    x = np.array([layers[k] for k in shown])
    bottom.errorbar(x, impact, yerr=_error_bars(impact, ci), fmt="o",
                    color=PLAIN, ecolor="0.5", capsize=3, label="largest verified impact, 95% CI (bootstrap)")
    for xi, yi, k in zip(x, ci[:, 1], shown):
        bottom.annotate(f"n{largest[k]['neuron']}, {len(entries[k]['significant_neurons'])} sig.", (xi, yi),
                        xytext=(0, 3), textcoords="offset points", fontsize=7, ha="center", va="bottom", rotation=90)
    bottom.axhline(HIGH_IMPACT, **HIGH_LINE, label=f"High Impact cut: impact > {HIGH_IMPACT:g}")
    bottom.set_xlabel("layer")
    bottom.set_ylabel(IMPACT_LABEL)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(bottom, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, borderaxespad=0.0)  # under the axis
    return fig


def plot_atlas(result: dict, output_dir: str | Path) -> list[Path]:
    """The atlas figure as OUTPUT_DIR/delta_atlas.png and .svg."""
    return _save(atlas_figure(result), Path(output_dir), "delta_atlas")
