"""The figures of the three steps: every file is written as PNG and SVG, and each figure's title,
axis labels, ticks and legend say what the reporter asked for, read back from the Figure objects
(never from pixels). The result dicts are small synthetic ones built here."""

import copy
import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer

from delta_steering.analysis import plots

MODEL = "state-spaces/mamba-130m-hf"
LAYER = 20


def words(text: str) -> str:
    """Text with its line breaks and (non-breaking) spaces collapsed to single spaces."""
    return " ".join(text.split())


def title(fig) -> str:
    return words(fig.get_suptitle())


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [words(t.get_text()) for t in legend.get_texts()]


def axis_by_ylabel(fig, fragment: str):
    return next(ax for ax in fig.axes if fragment in words(ax.get_ylabel()))


def assert_written(paths, output_dir, stems):
    """Each stem written as a real PNG and SVG in output_dir, and exactly those paths returned."""
    expected = {output_dir / f"{stem}.{suffix}" for stem in stems for suffix in ("png", "svg")}
    assert set(paths) == expected and len(paths) == len(expected)
    for path in expected:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
        else:
            assert data.lstrip().startswith(b"<?xml") and b"<svg" in data


# --- synthetic results ---------------------------------------------------------------------------

def record(neuron, impact, ci, q, variance):
    return {"neuron": neuron, "measured": True, "impact": impact, "accuracy": None if impact is None else 70 - impact,
            "ci95": ci, "q_value": q, "delta_variance": variance}


def step1_result():
    """Six measured neurons (one significant with q = 0, one with non-finite logits), ten screened out."""
    records = [record(7, 6.5, [4.0, 9.0], 0.0, 2e-3), record(3, 2.5, [0.5, 4.5], 0.04, 1e-4),
               record(1, 0.5, [-0.5, 1.5], 0.6, 5e-5), record(4, 0.0, [0.0, 0.0], 1.0, 1e-5),
               record(5, -2.5, [-4.0, -1.0], 0.2, 3e-4), record(6, None, None, 1.0, 2e-5)]
    records += [{"neuron": n, "measured": False, "impact": None, "accuracy": None, "q_value": 1.0,
                 "delta_variance": 1e-6 * n} for n in range(8, 18)]
    return {"all_neuron_impacts": records, "threshold": -2.0, "layer": LAYER, "model": MODEL, "ablation": "zero",
            "num_examples": {"piqa": 50, "arc_easy": 50}, "measured_neurons": 6, "delta_statistics_tokens": 1234}


def factor_table(deltas):
    rows = [{"factor": 1.0, "accuracy": 60.0, "delta": 0.0, "ci95": None, "p_value": None, "q_value": None,
             "label": "baseline"}]
    return rows + [{"factor": f, "accuracy": 60.0 + d, "delta": d, "ci95": [d - 2, d + 2], "p_value": 0.5,
                    "q_value": 0.5, "label": "~"} for f, d in zip((0.5, 2.0, 5.0), deltas)]


def step2_result(confirmed=True, perplexity=True):
    """High Impact: x2 beats the baseline (confirmed or not); Neutral: no factor beats the baseline."""
    confirmation = {"accuracy": 62.5, "baseline_accuracy": 60.0, "delta": 2.5, "ci95": [0.5, 4.5],
                    "p_value": 0.01 if confirmed else 0.3, "significant": confirmed}
    result = {
        "model": MODEL, "layer": LAYER, "tasks": ["piqa", "arc_easy"], "num_examples": 100,
        "selection_baseline_accuracy": 60.0, "confirmation_baseline_accuracy": 60.0,
        "selection_examples": [{}] * 100, "confirmation_examples": [{}] * 100,
        "groups": {"high_impact": {"neurons": [3, 7], "selection_size": 100, "confirmation_size": 100,
                                   "results": factor_table([-4.0, 3.0, 1.0])},
                   "neutral": {"neurons": [1, 4], "selection_size": 100, "confirmation_size": 100,
                               "results": factor_table([-1.0, -0.5, -2.0])}},
        "optimal_factors": {
            "high_impact": {"factor": 2.0, "beats_baseline": True, "selection_best_factor": 2.0,
                            "selection": {"accuracy": 63.0, "delta": 3.0, "q_value": 0.5},
                            "confirmation": confirmation, "confirmed": confirmed},
            "neutral": {"factor": 1.0, "beats_baseline": False, "selection_best_factor": 2.0,
                        "selection": {"accuracy": 59.5, "delta": -0.5, "q_value": 1.0},
                        "confirmation": None, "confirmed": False}},
        "importance_ranking": {"neurons": [
            {"neuron": 7, "impact": 5.0, "step1_impact": 6.5, "ci95": [3.0, 7.0]},
            {"neuron": 3, "impact": 1.0, "step1_impact": 2.5, "ci95": [-1.0, 3.0]},
            {"neuron": 1, "impact": 0.0, "step1_impact": 0.5, "ci95": [0.0, 0.0]},
            {"neuron": 6, "impact": None, "step1_impact": None, "ci95": None}],
            "spearman_step1_vs_heldout": 0.8},
    }
    if perplexity:
        result["perplexity"] = {"baseline": 10.0, "neurons": [3, 7], "factor": 2.0,
                                "factor_source": "step2-confirmed" if confirmed else "step2-unconfirmed",
                                "documents": {"count": 20},
                                "layers": [{"layer": l, "ablated": 10.0 + 0.01 * k, "amplified": 10.0 - 0.002 * k,
                                            "ablated_change": change(0.01 * k), "amplified_change": change(-0.002 * k)}
                                           for k, l in enumerate((19, 20, 21))]}
    return result


def change(delta, base=10.0):
    """A perplexity change from `base` with a CI of ±0.05 around it (and ±0.5% relative)."""
    relative = 100 * delta / base
    return {"delta": delta, "ci95": [delta - 0.05, delta + 0.05], "relative": relative,
            "relative_ci95": [relative - 0.5, relative + 0.5]}


def configuration(name, layer, factor, accuracy, ci, perplexity, neuron_set=None, ablated=False):
    moved = {} if perplexity is None or name == "baseline" else change(perplexity - 10.0)
    return {"name": name, "neuron_set": neuron_set, "ablated": ablated, "layer": layer, "factor": factor, "accuracy": accuracy, "delta": accuracy - 40.0,
            "ci95": ci, "p_value": 0.5, "perplexity": perplexity,
            "perplexity_delta": None if perplexity is None else perplexity - 10.0,
            "perplexity_ci95": moved.get("ci95"), "perplexity_relative": moved.get("relative"),
            "perplexity_relative_ci95": moved.get("relative_ci95"), "num_prompts": 30}


def step3_result(mode, factor_source="step2-unconfirmed", perplexity=True):
    """A step-3 result; with perplexity one configuration still lacks it, without none has it."""
    def ppl(value):
        return value if perplexity else None

    baseline = configuration("baseline", None, None, 40.0, [0.0, 0.0], ppl(10.0))
    if mode == "layer_ablation":
        entries = [configuration(f"delta_sensitive_L{l}", l, 2.0, 40.0 + d, [d - 5, d + 5], ppl(10.0 + 0.001 * d),
                                 "delta_sensitive")
                   for l, d in ((18, 0.0), (19, 3.0), (20, 5.0))]
    elif mode == "cluster_ablation":
        entries = [configuration("ablate_delta_sensitive_L20", LAYER, 0.0, 35.0, [-9.0, -1.0], ppl(10.2),
                                 "delta_sensitive", ablated=True),
                   configuration("ablate_random_L20", LAYER, 0.0, 40.0, [-3.0, 3.0], None, "random", ablated=True)]
    else:
        entries = [configuration("delta_sensitive_L20", LAYER, 2.0, 45.0, [1.0, 9.0], ppl(10.2), "delta_sensitive"),
                   configuration("random_L20", LAYER, 2.0, 38.0, [-6.0, 2.0], None, "random")]
    return {"model": MODEL, "layer": LAYER, "factor": 2.0, "factor_source": factor_source, "mode": mode,
            "ifeval_metric": "prompt_level_strict_acc", "num_prompts": 30,
            "pile_documents": {"count": 20} if perplexity else None, "configurations": [baseline, *entries]}


# --- step 1 ----------------------------------------------------------------------------------

STEP1_FIGURES = (plots.impact_ranked_figure, plots.impact_histogram_figure, plots.variance_vs_impact_figure)


def test_plot_discovery_writes_each_figure_as_png_and_svg(tmp_path):
    paths = plots.plot_discovery(step1_result(), tmp_path)
    assert_written(paths, tmp_path, [f"impact_ranked_L{LAYER}", f"impact_histogram_L{LAYER}",
                                     f"variance_vs_impact_L{LAYER}"])


@pytest.mark.parametrize("build", STEP1_FIGURES)
def test_step1_titles_name_model_layer_examples_and_measured_neurons(build):
    fig = build(step1_result())
    assert MODEL in title(fig) and f"layer {LAYER}" in title(fig)
    assert "100 discovery examples (2 tasks × 50)" in title(fig)
    assert "6 of 16 neurons measured (10 screened out by attribution" in title(fig)
    assert "1 with non-finite logits not shown" in title(fig)
    (ax,) = fig.axes
    assert "(points)" in ax.get_xlabel() + ax.get_ylabel()
    assert ax.get_xlabel() and ax.get_ylabel()


def test_step1_title_says_when_every_neuron_was_measured():
    result = step1_result()
    result["all_neuron_impacts"] = [r for r in result["all_neuron_impacts"] if r["measured"]]
    assert "all 6 neurons measured" in title(plots.impact_histogram_figure(result))


@pytest.mark.parametrize("build", STEP1_FIGURES)
def test_step1_legends_show_both_thresholds(build):
    (ax,) = build(step1_result()).axes
    legend = legend_texts(ax)
    assert "High Impact cut: impact > 2" in legend
    assert "beneficial threshold: impact ≥ −2" in legend


def test_impact_ranked_marks_significant_neurons_q_zero_included_and_labels_top_ids():
    fig = plots.impact_ranked_figure(step1_result())
    (ax,) = fig.axes
    legend = legend_texts(ax)
    assert "significant, BH q < 0.05 (2)" in legend  # neuron 7 (q = 0) and neuron 3 (q = 0.04)
    assert "not significant (3)" in legend
    assert {t.get_text() for t in ax.texts} == {"7", "3", "1", "4", "5"}
    horizontal = [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1]
    assert {line.get_ydata()[0] for line in horizontal} >= {2.0, -2.0}
    assert "neuron rank" in ax.get_xlabel()


def test_impact_histogram_counts_are_integers_and_cover_the_measured_neurons():
    (ax,) = plots.impact_histogram_figure(step1_result()).axes
    ticks = ax.get_yticks()
    assert len(ticks) >= 2 and np.allclose(ticks, np.round(ticks))
    assert "count" in ax.get_ylabel()
    groups = [t for t in legend_texts(ax) if re.search(r": \d+$", t)]
    assert groups == ["High Impact (> 2): 2", "Neutral (|impact| ≤ 2): 2", "impact < −2: 1"]


def test_step1_figures_survive_no_measured_neuron(tmp_path):
    result = step1_result()
    result["all_neuron_impacts"] = [r for r in result["all_neuron_impacts"] if not r["measured"]]
    paths = plots.plot_discovery(result, tmp_path)
    assert len(paths) == 6 and all(p.is_file() for p in paths)


# --- step 2 ----------------------------------------------------------------------------------

def test_plot_factors_writes_each_figure_as_png_and_svg(tmp_path):
    paths = plots.plot_factors(step2_result(), tmp_path / "with")
    assert_written(paths, tmp_path / "with", ["accuracy_vs_factor", "step1_vs_heldout_impact", "perplexity_vs_layer"])
    paths = plots.plot_factors(step2_result(perplexity=False), tmp_path / "without")
    assert_written(paths, tmp_path / "without", ["accuracy_vs_factor", "step1_vs_heldout_impact"])


def test_accuracy_vs_factor_ticks_at_the_factors_used_with_baseline_and_ci_band():
    fig = plots.accuracy_vs_factor_figure(step2_result())
    assert MODEL in title(fig) and f"layer {LAYER}" in title(fig)
    assert "100 of 200 held-out examples" in title(fig)
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "1", "2", "5"]
        assert list(ax.get_xticks()) == [0.5, 1.0, 2.0, 5.0]
        assert ax.xaxis.get_minorticklocs().size == 0  # no 6×10⁻¹-style minor labels
        assert "steering factor" in ax.get_xlabel()
        legend = legend_texts(ax)
        assert "baseline, factor 1 (60.0%)" in legend and "95% CI of the change" in legend
    assert "(%)" in fig.axes[0].get_ylabel()


def test_accuracy_vs_factor_marks_a_confirmed_optimum_and_says_when_no_factor_wins():
    high, neutral = plots.accuracy_vs_factor_figure(step2_result(confirmed=True)).axes
    assert "High Impact group (2 neurons): optimum ×2, confirmed" in words(high.get_title())
    assert "optimum ×2 (confirmed)" in legend_texts(high)
    assert "no factor beats the baseline (best: ×2, −0.5 points)" in words(neutral.get_title())
    assert not any(t.startswith("optimum") for t in legend_texts(neutral))


def test_accuracy_vs_factor_says_when_the_optimum_is_unconfirmed():
    high, _ = plots.accuracy_vs_factor_figure(step2_result(confirmed=False)).axes
    assert "optimum ×2, unconfirmed: Δ +2.5 points, p = 0.3" in words(high.get_title())
    assert "optimum ×2 (unconfirmed)" in legend_texts(high)


def test_step1_vs_heldout_has_units_identity_line_n_layer_and_rho():
    fig = plots.step1_vs_heldout_figure(step2_result())
    assert "n = 3 neurons" in title(fig) and "Spearman ρ = 0.80" in title(fig)
    assert MODEL in title(fig) and f"layer {LAYER}" in title(fig)
    (ax,) = fig.axes
    assert "(points)" in ax.get_xlabel() and "(points)" in ax.get_ylabel()
    assert "y = x (same impact)" in legend_texts(ax)
    identity = [line for line in ax.get_lines() if line.get_label().startswith("y = x")]
    assert np.array_equal(identity[0].get_xdata(), identity[0].get_ydata())
    assert ax.get_xlim() == ax.get_ylim()


def errorbar_by_label(ax, label):
    """The data line and the vertical CI segments of the errorbar labelled `label`."""
    container = next(c for c in ax.containers if c.get_label() == label)
    return container.lines[0], container.lines[2][0].get_segments()


def test_perplexity_vs_layer_plots_the_relative_change_with_its_ci_and_the_zero_line():
    fig = plots.perplexity_vs_layer_figure(step2_result(confirmed=False))
    assert MODEL in title(fig) and f"layer {LAYER}" in title(fig) and "unconfirmed" in title(fig)
    assert "error bars: 95% paired-bootstrap CI over documents" in title(fig)
    (ax,) = fig.axes
    assert ax.get_ylabel() == "Pile perplexity: change from baseline (%)" and ax.get_xlabel() == "layer steered"
    line, segments = errorbar_by_label(ax, "ablated (factor 0)")
    assert np.allclose(line.get_ydata(), [0.0, 0.1, 0.2])  # percent of the baseline 10.0
    assert np.allclose([s[:, 1] for s in segments], [[-0.5, 0.5], [-0.4, 0.6], [-0.3, 0.7]])
    zero = next(line for line in ax.get_lines() if line.get_label().startswith("no change"))
    assert np.allclose(zero.get_ydata(), 0)


# --- step 3 ----------------------------------------------------------------------------------

def test_plot_verification_writes_each_mode_as_png_and_svg(tmp_path):
    results = {"cluster_ablation": step3_result("cluster_ablation"), "layer_ablation": step3_result("layer_ablation")}
    assert_written(plots.plot_verification(results, tmp_path), tmp_path,
                   ["cluster_ablation_configurations", "layer_ablation_configurations", "layer_ablation_vs_layer"])
    combined = tmp_path / "combined"
    assert_written(plots.plot_verification({"combined": step3_result("combined")}, combined), combined,
                   ["combined_configurations"])


def test_configurations_title_names_model_layer_factor_and_its_source():
    fig = plots.configurations_figure(step3_result("combined"), "combined")
    assert title(fig).startswith(f"Step 3: combined steering, {MODEL}, layer {LAYER}, factor ×2 (unconfirmed")
    assert "30 IFEval prompts" in title(fig) and "20 Pile documents" in title(fig)
    confirmed = plots.configurations_figure(step3_result("combined", "step2-confirmed"), "combined")
    assert "confirmed in step 2" in title(confirmed) and "unconfirmed" not in title(confirmed)
    ablation = plots.configurations_figure(step3_result("cluster_ablation"), "cluster_ablation")
    assert "neuron sets ablated" in title(ablation) and "×" not in title(ablation)


def test_configurations_accuracy_has_readable_metric_ci_error_bars_and_baseline():
    fig = plots.configurations_figure(step3_result("combined"), "combined")
    ax = axis_by_ylabel(fig, "accuracy")
    assert ax.get_ylabel() == "IFEval prompt-level strict accuracy (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["baseline", "delta-sensitive, L20", "random, L20"]
    assert "baseline (40.0%)" in legend_texts(ax)
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    assert [round(b.get_height(), 6) for b in bars] == [40.0, 45.0, 38.0]
    segments = bars.errorbar.lines[2][0].get_segments()  # vertical CI segments: baseline + ci95
    assert [tuple(s[:, 1]) for s in segments[1:]] == [(41.0, 49.0), (34.0, 42.0)]
    assert {t.get_text() for t in ax.texts} == {"+5.0", "−2.0"}


def test_configurations_perplexity_is_the_relative_change_with_its_ci_and_says_what_is_missing():
    fig = plots.configurations_figure(step3_result("combined"), "combined")
    ax = axis_by_ylabel(fig, "perplexity")
    assert ax.get_ylabel() == "Pile perplexity: change from baseline (%)"
    assert "baseline 10.000" in ax.get_title() and "95% CI" in ax.get_title()
    heights = [p.get_height() for p in ax.patches]
    assert np.allclose(heights, [2.0]) and ax.patches[0].get_y() == 0  # 10.2 vs 10.0: +2%
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    assert np.allclose(bars.errorbar.lines[2][0].get_segments()[0][:, 1], [1.5, 2.5])
    assert "not measured" in {t.get_text() for t in ax.texts}


def test_configurations_without_any_perplexity():
    fig = plots.configurations_figure(step3_result("combined", perplexity=False), "combined")
    ax = axis_by_ylabel(fig, "perplexity")
    assert "change from baseline" in ax.get_ylabel() and not ax.patches
    assert "perplexity not measured" in {t.get_text() for t in ax.texts}
    assert "Pile documents" not in title(fig)


def test_layer_ablation_vs_layer_titles_and_labels():
    fig = plots.layer_ablation_vs_layer_figure(step3_result("layer_ablation"))
    assert MODEL in title(fig) and f"layer {LAYER}'s neurons at layers 18–20" in title(fig)
    assert "factor ×2 (unconfirmed" in title(fig)
    accuracy, perplexity = fig.axes
    assert words(accuracy.get_ylabel()) == "IFEval prompt-level strict accuracy (%)"
    assert words(perplexity.get_ylabel()) == "Pile perplexity: change from baseline (%)"
    assert perplexity.get_xlabel() == "layer steered"
    line, segments = errorbar_by_label(perplexity, "95% CI over documents")
    assert np.allclose(line.get_ydata(), [0.0, 0.03, 0.05])
    assert np.allclose([s[:, 1] for s in segments], [[-0.5, 0.5], [-0.47, 0.53], [-0.45, 0.55]])


def test_step3_titles_say_what_the_mode_ran():
    result = {**step3_result("layer_ablation"),
              "mode_title": "Layer ablation: delta-sensitive set, ×2 amplification at layers 18–20"}
    for fig in (plots.layer_ablation_vs_layer_figure(result), plots.configurations_figure(result)):
        assert title(fig).startswith("Step 3: Layer ablation: delta-sensitive set, ×2 amplification at layers 18–20 "
                                     f"(factor unconfirmed in step 2), {MODEL}, layer {LAYER}'s neurons")


def test_figure_functions_do_not_modify_the_result():
    for build, result in ((plots.impact_ranked_figure, step1_result()), (plots.accuracy_vs_factor_figure, step2_result()),
                          (plots.configurations_figure, step3_result("combined"))):
        before = copy.deepcopy(result)
        build(result)
        assert result == before


# --- atlas ---------------------------------------------------------------------------------------

def atlas_result():
    """Two layers of four neurons: two measured per layer (one from the recall sample), the rest estimated."""
    def measured(neuron, impact, q, sample=False):
        return {"neuron": neuron, "impact": impact, "ci95": [impact - 1, impact + 1], "q_value": q,
                "recall_sample": sample}

    layers = [{"layer": 3, "estimated_impact": [0.5, -0.2, 0.0, 0.1], "significant_neurons": [1],
               "verified": [measured(0, 1.0, 0.5), measured(1, 6.0, 0.01, sample=True)],
               "largest_verified": {"neuron": 1, "impact": 6.0, "ci95": [5.0, 7.0], "q_value": 0.01}},
              {"layer": 4, "estimated_impact": [0.0, 0.3, -0.4, 0.2], "significant_neurons": [],
               "verified": [measured(2, -2.0, 0.9), measured(3, 0.5, 0.9)],
               "largest_verified": {"neuron": 3, "impact": 0.5, "ci95": [-0.5, 1.5], "q_value": 0.9}}]
    return {"model": MODEL, "layers": layers, "neurons_per_layer": 4, "verify_top": 1, "ablation": "zero",
            "num_examples": {"t": 10}, "recall": {"sample_size": 1}}


def test_atlas_shows_exact_impacts_where_measured_and_fades_the_estimates():
    fig = plots.atlas_figure(atlas_result())
    top = fig.axes[0]
    faded, solid = top.get_images()
    assert faded.get_alpha() == plots.ESTIMATE_ALPHA < 1 and solid.get_alpha() in (None, 1)
    np.testing.assert_array_equal(faded.get_array(), [[0.5, -0.2, 0.0, 0.1], [0.0, 0.3, -0.4, 0.2]])
    exact = solid.get_array()
    assert exact[0, 1] == 6.0 and exact[1, 2] == -2.0 and exact.mask.tolist() == [[False, False, True, True],
                                                                                   [True, True, False, False]]
    assert "faded: estimated by attribution only" in legend_texts(top)
    assert "measured exactly: the recall sample (random)" in legend_texts(top)
    assert "estimated (faded)" in words(fig.axes[-1].get_ylabel())  # the colour bar says which is which


def test_atlas_legends_lie_off_the_data():
    fig = plots.atlas_figure(atlas_result())
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes[:2]:
        legend = ax.get_legend().get_window_extent(renderer)
        assert not legend.overlaps(ax.get_window_extent(renderer)), ax.get_ylabel()
