import math

import pytest
import torch

from delta_steering import steer
from delta_steering.perplexity import perplexity

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
