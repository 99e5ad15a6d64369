import math

import numpy as np
import pytest
import torch

from delta_steering import steer
from delta_steering.engine.perplexity import document_losses, perplexity
from delta_steering.analysis.metrics import perplexity_change

DOCS = ["The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
        "Write a poem about the sea. Do not use any commas in your response, please."]


def direct(model, tokenizer, texts, max_length):
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text)[:max_length]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("max_length,batch_size", [(512, None), (512, 1), (9, 2)])
def test_perplexity_equals_direct_computation(tiny_model, tokenizer, max_length, batch_size):
    expected = direct(tiny_model, tokenizer, DOCS, max_length)
    assert perplexity(tiny_model, tokenizer, DOCS, max_length, batch_size) == pytest.approx(expected, rel=1e-5)


def test_perplexity_sees_steering(tiny_model, tokenizer):
    base = perplexity(tiny_model, tokenizer, DOCS)
    with steer(tiny_model, 20, list(range(32)), 5.0):
        steered = perplexity(tiny_model, tokenizer, DOCS)
        expected = direct(tiny_model, tokenizer, DOCS, 512)
    assert steered != pytest.approx(base, rel=1e-4)
    assert steered == pytest.approx(expected, rel=1e-5)


def test_document_losses_are_each_documents_summed_nll_and_predicted_tokens(tiny_model, tokenizer):
    losses = document_losses(tiny_model, tokenizer, DOCS, 512, 1)
    for text, nll, tokens in zip(DOCS, losses["nll"], losses["tokens"]):
        ids = tokenizer.encode(text)
        assert tokens == len(ids) - 1
        assert math.exp(nll / tokens) == pytest.approx(direct(tiny_model, tokenizer, [text], 512), rel=1e-5)


def independent_bootstrap(base_nll, other_nll, tokens, resamples, seed):
    """Documents resampled with replacement, the same draw for both configurations: the 2.5% and
    97.5% quantiles of the perplexity change and of the relative change (percent)."""
    rng = np.random.default_rng(seed)
    deltas, relatives = [], []
    for _ in range(resamples):
        pick = rng.integers(0, len(tokens), len(tokens))
        base = math.exp(sum(base_nll[i] for i in pick) / sum(tokens[i] for i in pick))
        other = math.exp(sum(other_nll[i] for i in pick) / sum(tokens[i] for i in pick))
        deltas.append(other - base)
        relatives.append(100 * (other / base - 1))
    return np.quantile(deltas, [0.025, 0.975]), np.quantile(relatives, [0.025, 0.975])


def test_perplexity_change_ci_matches_an_independent_bootstrap():
    rng = np.random.default_rng(7)
    tokens = rng.integers(20, 400, 80).tolist()
    base_nll = [t * rng.uniform(1.5, 2.3) for t in tokens]
    other_nll = [b + t * rng.normal(0.004, 0.02) for b, t in zip(base_nll, tokens)]  # a small, noisy shift
    change = perplexity_change({"nll": base_nll, "tokens": tokens}, {"nll": other_nll, "tokens": tokens}, seed=3)
    base = math.exp(sum(base_nll) / sum(tokens))
    other = math.exp(sum(other_nll) / sum(tokens))
    assert change["delta"] == pytest.approx(other - base, abs=1e-6)
    assert change["relative"] == pytest.approx(100 * (other / base - 1), abs=1e-5)
    delta_ci, relative_ci = independent_bootstrap(base_nll, other_nll, tokens, 4000, seed=11)
    for ours, reference in ((change["ci95"], delta_ci), (change["relative_ci95"], relative_ci)):
        width = reference[1] - reference[0]
        assert ours[0] < ours[1] and abs(ours[0] - reference[0]) < 0.1 * width
        assert abs(ours[1] - reference[1]) < 0.1 * width
    same = perplexity_change({"nll": base_nll, "tokens": tokens}, {"nll": base_nll, "tokens": tokens})
    assert same == {"delta": 0.0, "ci95": [0.0, 0.0], "relative": 0.0, "relative_ci95": [0.0, 0.0]}
    broken = perplexity_change({"nll": base_nll, "tokens": tokens}, {"nll": [math.nan] * 80, "tokens": tokens})
    assert broken["delta"] is None and broken["ci95"] is None
