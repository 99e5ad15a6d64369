"""First-order attribution (engine/attribution.py): its estimates against exact ablation by the
fast engine and finite differences, on Mamba-1 and Falcon-Mamba; the screens compared."""

import numpy as np
import pytest
import torch

from delta_steering.analysis.estimates import estimated_correctness, estimated_impacts
from delta_steering.analysis.metrics import correctness
from delta_steering.engine.attribution import attribution, request_scores
from delta_steering.engine.batching import pad_batch
from delta_steering.engine.fast_sweep import fast_loglikelihoods
from delta_steering.engine.scoring import encode_examples, loglikelihoods
from delta_steering.engine.sweep import sweep_loglikelihoods
from delta_steering.intervention import Intervention
from delta_steering.model.sites import OutputHead
from delta_steering.model.steering import steer

NEURONS = [0, 13, 31]
ALL = list(range(32))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def attribution_estimates(model, tokenizer, examples, encoded, layer, factor):
    """(delta neurons, requests): the estimated score change of every neuron scaled alone by `factor`."""
    return attribution(model, tokenizer, examples, encoded, layer, Intervention.scale(ALL, factor)).delta


def mc_only(examples):
    return [e for e in examples if e.metric != "greedy"]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(v.ravel())) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


@pytest.mark.parametrize("layer", [10, 20])
def test_attribution_matches_finite_differences(tiny_model, tokenizer, examples, layer):
    """For a factor near 1 the first-order estimate is the exact change up to O(eps^2)."""
    examples = mc_only(examples)
    encoded = encode_examples(tokenizer, examples)
    base, _ = loglikelihoods(tiny_model, tokenizer, encoded)
    exact = fast_loglikelihoods(tiny_model, tokenizer, encoded, layer, Intervention.scale(ALL, 1.01))[0] - base
    estimate = attribution_estimates(tiny_model, tokenizer, examples, encoded, layer, 1.01)
    assert estimate.shape == (32, len(encoded))
    assert np.linalg.norm(exact) > 1e-3
    assert np.linalg.norm(estimate - exact) < 0.1 * np.linalg.norm(exact)


def test_attribution_ranks_small_steering_effects(tiny_model, tokenizer, examples):
    """At factor 0.9 linearisation is still good: estimates and exact changes rank alike."""
    examples = mc_only(examples)
    encoded = encode_examples(tokenizer, examples)
    base, _ = loglikelihoods(tiny_model, tokenizer, encoded)
    exact = fast_loglikelihoods(tiny_model, tokenizer, encoded, 20, Intervention.scale(ALL, 0.9))[0] - base
    estimate = attribution_estimates(tiny_model, tokenizer, examples, encoded, 20, 0.9)
    assert spearman(estimate, exact) > 0.9


@pytest.mark.parametrize("layer", [20, 23])
def test_the_mixer_screen_is_closer_to_exact_ablation_than_the_dt_pre_gradient(tiny_model, tokenizer, examples, layer):
    """Zero ablation saturates softplus and the scan's decay: linearising in dt_pre shrinks large
    effects; the mixer screen computes the block exactly and linearises only the blocks after it."""
    examples = mc_only(examples)
    encoded = encode_examples(tokenizer, examples)
    base, _ = loglikelihoods(tiny_model, tokenizer, encoded)
    exact = fast_loglikelihoods(tiny_model, tokenizer, encoded, layer, Intervention.scale(ALL, 0.0))[0] - base
    error = {screen: np.linalg.norm(attribution(tiny_model, tokenizer, examples, encoded, layer,
                                                Intervention.scale(ALL, 0.0), screen=screen).delta - exact)
             for screen in ("mixer", "gradient")}
    assert error["mixer"] < 0.5 * error["gradient"], error


def test_an_unknown_screen_is_refused(tiny_model, tokenizer, examples, encoded):
    with pytest.raises(ValueError, match="unknown screen 'exactish'"):
        attribution(tiny_model, tokenizer, examples, encoded, 20, Intervention.scale(ALL, 0.0), screen="exactish")


def test_mean_ablation_estimate_is_the_zero_ablation_one_for_zero_means(tiny_model, tokenizer, examples, encoded):
    zero = attribution(tiny_model, tokenizer, examples, encoded, 20, Intervention.scale(ALL, 0.0))
    mean = attribution(tiny_model, tokenizer, examples, encoded, 20, Intervention.ablation("mean", ALL, [0.0] * 32))
    np.testing.assert_allclose(mean.delta, zero.delta, rtol=1e-6, atol=1e-9)


def test_greedy_margin_gradient(tiny_model, tokenizer, examples, encoded):
    """Greedy examples are scored by their greedy margin; its estimate matches a finite difference."""
    att = attribution(tiny_model, tokenizer, examples, encoded, 20, Intervention.scale(ALL, 1.01))
    rows = [r for r, kind in enumerate(att.kinds) if kind == "margin"]
    items = [encoded[r] for r in rows]
    ids, lengths = pad_batch(items, 0, "cpu")

    def margins():
        with torch.no_grad():
            hidden = tiny_model.backbone(input_ids=ids).last_hidden_state
            return request_scores(OutputHead(tiny_model), hidden, items, lengths, ["margin"] * len(items)).numpy()

    base = margins()
    np.testing.assert_allclose(att.base[rows], base, atol=1e-4)
    for neuron in [2, 9]:
        with steer(tiny_model, 20, [neuron], 1.01):
            exact = margins() - base
        assert np.abs(att.delta[neuron, rows] - exact).max() < 0.1 * np.abs(exact).max() + 1e-6


def test_estimated_impacts(tiny_model, tokenizer, examples, encoded):
    att = attribution(tiny_model, tokenizer, examples, encoded, 20, Intervention.scale(ALL, 0.0))
    predicted = estimated_correctness(examples, att)
    assert predicted.shape == (32, len(examples))
    base_lp, base_greedy = loglikelihoods(tiny_model, tokenizer, encoded)
    impact, margin_loss = estimated_impacts(examples, att)
    assert impact.shape == margin_loss.shape == (32,)
    # with no change the prediction is the baseline, and nothing is estimated to change
    att.delta[:] = 0
    np.testing.assert_array_equal(estimated_correctness(examples, att)[0], correctness(examples, base_lp, base_greedy))
    impact, margin_loss = estimated_impacts(examples, att)
    assert not impact.any() and not margin_loss.any()


def test_falcon_mamba_fast_equals_naive_and_attribution_matches_finite_differences(tokenizer, examples, encoded):
    """Falcon-Mamba normalises t, B and C inside the mixer; the fast engine and attribution take that
    path too."""
    from families import make_tiny

    model = make_tiny("falcon_mamba", vocab_size=len(tokenizer), num_hidden_layers=4)
    for intervention in (Intervention.scale(NEURONS, 0.0), Intervention.scale(NEURONS, 3.0)):
        naive_lp, naive_greedy = sweep_loglikelihoods(model, tokenizer, encoded, 2, intervention, engine="naive")
        fast_lp, fast_greedy = sweep_loglikelihoods(model, tokenizer, encoded, 2, intervention, engine="fast")
        np.testing.assert_allclose(fast_lp, naive_lp, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(fast_greedy, naive_greedy)
    base, _ = loglikelihoods(model, tokenizer, encoded)
    assert np.abs(naive_lp - base).max() > 1e-3
    chosen = mc_only(examples)
    chosen_encoded = encode_examples(tokenizer, chosen)
    base, _ = loglikelihoods(model, tokenizer, chosen_encoded)
    exact = fast_loglikelihoods(model, tokenizer, chosen_encoded, 2, Intervention.scale(ALL, 1.01))[0] - base
    estimate = attribution(model, tokenizer, chosen, chosen_encoded, 2, Intervention.scale(ALL, 1.01)).delta
    assert np.linalg.norm(estimate - exact) < 0.1 * np.linalg.norm(exact)
