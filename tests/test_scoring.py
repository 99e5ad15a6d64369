"""Batched log-likelihood scoring against a naive one-sequence-at-a-time computation."""

import copy

import numpy as np
import pytest
import torch

from delta_steering.engine.batching import Encoded
from delta_steering.model.continuation import continues_exactly
from delta_steering.engine.reading import choice_for, group_shape
from delta_steering.analysis.metrics import correctness, summarize
from delta_steering.engine.scoring import encode_examples, encode_pair, loglikelihoods, score_examples, shared_context_groups
from delta_steering.data.tasks import Example
from families import make_tiny

PAIRS = [("Question: What is the capital of France?\nAnswer:", " Paris"),
         ("The quick brown fox ", "jumps over the lazy dog."),
         ("", "In the beginning"),
         ("A man is sitting on a roof. he", " starts pulling up roofing."),
         ("1 2 3 4", " 5"), ("apples, oranges;", " bananas! cherries?"),
         ("Write a poem about the sea.", " Do not use any commas in your response.")]


def naive_loglikelihood(model, tokenizer, context, continuation):
    """Independent reference: whole logits of one unpadded sequence, lm-eval's encoding."""
    if context:
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        ctx = tokenizer(context, add_special_tokens=False).input_ids
        whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
        cont = whole[len(ctx):]
        ctx = whole[: len(ctx)]
    else:
        ctx, cont = [tokenizer.eos_token_id], tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0, -len(cont):]
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def test_encode_pair_moves_trailing_space_and_prefixes_empty_context(tokenizer):
    moved = encode_pair(tokenizer, "The quick brown fox ", "jumps")
    assert list(moved.tokens) == tokenizer("The quick brown fox jumps", add_special_tokens=False).input_ids
    assert tokenizer.decode(moved.tokens[-moved.n_target:]).startswith(" ")
    empty = encode_pair(tokenizer, "", "In the beginning")
    assert empty.tokens[0] == tokenizer.eos_token_id and empty.n_target == len(empty.tokens) - 1


@pytest.mark.parametrize("batch_size", [1, 3, 16, None])
def test_batched_loglikelihoods_equal_naive(tiny_model, tokenizer, batch_size):
    encoded = [encode_pair(tokenizer, c, t) for c, t in PAIRS]
    logprob, greedy = loglikelihoods(tiny_model, tokenizer, encoded, batch_size)
    for (c, t), lp, g in zip(PAIRS, logprob, greedy):
        ref_lp, ref_g = naive_loglikelihood(tiny_model, tokenizer, c, t)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert g == ref_g


# multiple choice (continuations of 1 to many tokens), a moved trailing space, empty contexts (EOS
# shared), and requests alone in their context
SHARED = [("Question: What is the capital of France?\nAnswer:", (" Paris", " London, the capital of England", " a")),
          ("The quick brown fox ", ("jumps over the lazy dog.", "sleeps")),
          ("", ("In the beginning", "Hello there", "x")),
          ("1 2 3 4", (" 5",)), ("apples, oranges;", (" bananas! cherries?",))]
SHARED_PAIRS = [(c, t) for c, choices in SHARED for t in choices]


def family_model(name: str, tokenizer):
    return make_tiny(name, vocab_size=len(tokenizer))


def tokens_read(model, fn) -> int:
    """How many input tokens the model's embeddings see while `fn` runs."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].numel()))
    try:
        fn()
    finally:
        handle.remove()
    return sum(seen)


def test_requests_that_share_a_context_are_grouped(tokenizer):
    encoded = [encode_pair(tokenizer, c, t) for c, t in SHARED_PAIRS]
    assert shared_context_groups(encoded) == [[0, 1, 2], [3, 4], [5, 6, 7]]


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba", "mamba2"])
@pytest.mark.parametrize("batch_size", [1, 2, None])
def test_shared_contexts_equal_whole_sequences_and_naive(tiny_model, tokenizer, family, batch_size):
    model = tiny_model if family == "mamba" else family_model(family, tokenizer)
    assert continues_exactly(model)
    encoded = [encode_pair(tokenizer, c, t) for c, t in SHARED_PAIRS]
    shared_lp, shared_greedy = loglikelihoods(model, tokenizer, encoded, batch_size, share_contexts=True)
    whole_lp, whole_greedy = loglikelihoods(model, tokenizer, encoded, batch_size, share_contexts=False)
    np.testing.assert_allclose(shared_lp, whole_lp, rtol=0, atol=1e-4)
    assert np.array_equal(shared_greedy, whole_greedy)
    for (c, t), lp, g in zip(SHARED_PAIRS, shared_lp, shared_greedy):
        ref_lp, ref_g = naive_loglikelihood(model, tokenizer, c, t)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert g == ref_g


def tokens_once(encoded, groups) -> int:
    """Tokens read at batch size 1 when `groups` read their context once (a group's continuations
    together, right-padded to its longest) and every other request is read whole."""
    grouped = {i for g in groups for i in g}
    return (sum(len(encoded[g[0]].tokens) - encoded[g[0]].n_target for g in groups)
            + sum(len(g) * max(encoded[i].n_target - 1 for i in g) for g in groups)
            + sum(len(e.tokens) - 1 for i, e in enumerate(encoded) if i not in grouped))


def test_a_shared_context_is_read_once_when_asked(tiny_model, tokenizer):
    encoded = [encode_pair(tokenizer, c, t) for c, t in SHARED_PAIRS]
    once = tokens_once(encoded, shared_context_groups(encoded))
    assert tokens_read(tiny_model, lambda: loglikelihoods(tiny_model, tokenizer, encoded, 1,
                                                          share_contexts=True)) == once
    whole = sum(len(e.tokens) - 1 for e in encoded)
    assert tokens_read(tiny_model, lambda: loglikelihoods(tiny_model, tokenizer, encoded, 1,
                                                          share_contexts=False)) == whole > once


def test_by_default_each_shape_is_read_the_way_measured_faster(tiny_model, tokenizer):
    """A fresh model races every shape of group once, records the faster way, and from then on reads
    each group as recorded; the numbers equal both ways'."""
    model = copy.deepcopy(tiny_model)
    encoded = [encode_pair(tokenizer, c, t) for c, t in SHARED_PAIRS]
    groups = shared_context_groups(encoded)
    choice = choice_for(model, "scoring")
    raced = loglikelihoods(model, tokenizer, encoded, 1)
    assert set(choice.shared) == {group_shape(encoded, g) for g in groups}
    expected = tokens_once(encoded, [g for g in groups if choice.shared[group_shape(encoded, g)]])
    assert tokens_read(model, lambda: loglikelihoods(model, tokenizer, encoded, 1)) == expected
    for forced in (True, False):
        lp, greedy = loglikelihoods(model, tokenizer, encoded, 1, share_contexts=forced)
        np.testing.assert_allclose(raced[0], lp, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(raced[1], greedy)


@pytest.mark.parametrize("shared", [True, False])
def test_a_recorded_choice_is_followed(tiny_model, tokenizer, shared):
    model = copy.deepcopy(tiny_model)
    encoded = [encode_pair(tokenizer, c, t) for c, t in SHARED_PAIRS]
    groups = shared_context_groups(encoded)
    choice_for(model, "scoring").shared.update({group_shape(encoded, g): shared for g in groups})
    expected = tokens_once(encoded, groups if shared else [])
    assert tokens_read(model, lambda: loglikelihoods(model, tokenizer, encoded, 1)) == expected


def test_mamba2_reads_a_shared_context_once_when_asked(tokenizer):
    model = family_model("mamba2", tokenizer)
    encoded = [encode_pair(tokenizer, c, t) for c, t in SHARED_PAIRS]
    whole = sum(len(e.tokens) - 1 for e in encoded)
    assert tokens_read(model, lambda: loglikelihoods(model, tokenizer, encoded, 1, share_contexts=False)) == whole
    assert tokens_read(model, lambda: loglikelihoods(model, tokenizer, encoded, 1, share_contexts=True)) < whole


def assert_whole_sequences(model, tokenizer, encoded):
    """`share_contexts=True` changes nothing where contexts are not shared: same numbers, every token read."""
    assert not continues_exactly(model)
    asked = loglikelihoods(model, tokenizer, encoded, share_contexts=True)
    whole = loglikelihoods(model, tokenizer, encoded, share_contexts=False)
    assert np.array_equal(asked[0], whole[0]) and np.array_equal(asked[1], whole[1])
    read = tokens_read(model, lambda: loglikelihoods(model, tokenizer, encoded, 1, share_contexts=True))
    assert read == sum(len(e.tokens) - 1 for e in encoded)
    return asked


@pytest.mark.parametrize("family", ["bamba", "jamba"])
def test_families_without_shared_contexts_run_whole_sequences(tokenizer, family):
    model = family_model(family, tokenizer)
    logprob, greedy = assert_whole_sequences(model, tokenizer, [encode_pair(tokenizer, c, t) for c, t in SHARED_PAIRS])
    for (c, t), lp, g in zip(SHARED_PAIRS, logprob, greedy):
        ref_lp, ref_g = naive_loglikelihood(model, tokenizer, c, t)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert g == ref_g


@pytest.mark.parametrize("batch_size", [1, None])
def test_a_limited_time_step_still_shares_contexts_exactly(tokenizer, batch_size):
    """The continuation goes through Mamba-2's chunked scan, which applies `time_step_limit`, even for
    one-token continuations (transformers' one-token step would not): two choices of two targets."""
    model = make_tiny("mamba2", vocab_size=len(tokenizer), time_step_limit=(0.05, 0.8))
    assert continues_exactly(model)
    context = (5, 17, 9, 33, 2, 41)
    encoded = [Encoded(context + (7, 8), 2), Encoded(context + (11, 3), 2), Encoded(context + (4,), 1)]
    shared = loglikelihoods(model, tokenizer, encoded, batch_size, share_contexts=True)
    whole = loglikelihoods(model, tokenizer, encoded, batch_size, share_contexts=False)
    assert tokens_read(model, lambda: loglikelihoods(model, tokenizer, encoded, batch_size,
                                                     share_contexts=True)) < 3 * len(context)
    np.testing.assert_allclose(shared[0], whole[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(shared[1], whole[1])
    unlimited = make_tiny("mamba2", vocab_size=len(tokenizer))
    unlimited.load_state_dict(model.state_dict())
    assert np.abs(loglikelihoods(unlimited, tokenizer, encoded)[0] - whole[0]).max() > 1e-4  # the limit bites


def test_half_precision_runs_whole_sequences(tokenizer):
    """In half precision transformers' scan rounds its state to the model's dtype before reading it
    out, which a continuation from the cached float32 state would not: requests are read whole."""
    model = family_model("mamba", tokenizer).to(torch.bfloat16)
    assert_whole_sequences(model, tokenizer, [encode_pair(tokenizer, c, t) for c, t in SHARED_PAIRS])


def make_examples():
    return [
        Example("mc", 0, (("Key 1 is", " red"), ("Key 1 is", " blue")), (" red", " blue"), 1, "acc"),
        Example("norm", 0, (("Pick", " a"), ("Pick", " a much longer choice")), ("a", "a much longer choice"), 0, "acc_norm"),
        Example("lambada", 0, (("The quick brown fox jumps over the lazy", " dog."),), ("dog.",), 0, "greedy"),
    ]


def test_correctness_metrics_by_hand():
    examples = make_examples()
    logprob = np.array([-5.0, -4.0, -3.0, -10.0, -1.0])
    greedy = np.array([False, False, False, False, True])
    # acc: argmax(-5,-4)=1 correct; acc_norm: -3/1 vs -10/20 -> choice 1 wins, label 0 wrong; greedy: correct
    assert correctness(examples, logprob, greedy).tolist() == [1.0, 0.0, 1.0]
    summary = summarize(examples, np.array([1.0, 0.0, 1.0]))
    assert summary["per_task"] == {"mc": 100.0, "norm": 0.0, "lambada": 100.0}
    assert summary["accuracy"] == pytest.approx(200 / 3, abs=1e-3)


def test_non_finite_logits_are_reported_not_scored_wrong():
    examples = make_examples()
    logprob = np.array([np.nan, -4.0, -3.0, -10.0, -1.0])
    correct = correctness(examples, logprob, np.zeros(5, dtype=bool))
    assert np.isnan(correct[0])
    summary = summarize(examples, correct)
    assert summary["per_task"]["mc"] is None and summary["accuracy"] is None
    assert summary["non_finite"] == {"mc": 1}


def test_overflowing_logits_are_detected(tiny_model, tokenizer):
    encoded = [encode_pair(tokenizer, "The quick brown", " fox")]
    weight = tiny_model.lm_head.weight.detach().clone()
    with torch.no_grad():
        tiny_model.lm_head.weight[7] = float("inf")  # as an overflowing fp16 run would produce
    try:
        logprob, greedy = loglikelihoods(tiny_model, tokenizer, encoded)
    finally:
        with torch.no_grad():
            tiny_model.lm_head.weight.copy_(weight)
    assert np.isnan(logprob[0]) and not greedy[0]


def test_evaluate_is_batch_size_independent(tiny_model, tokenizer):
    examples = make_examples() * 3
    results = [score_examples(tiny_model, tokenizer, examples, batch_size=b) for b in (1, 4, None)]
    assert all(np.array_equal(results[0], r) for r in results)
    assert len(encode_examples(tokenizer, examples)) == 15


def disagreeing_loglikelihoods(choices: list[str], gold: int) -> np.ndarray:
    """Log-likelihoods for which per-character and per-byte normalisation pick different choices, one
    of them `gold`: a non-ASCII choice k trails an ASCII choice m by a hair per character but leads
    per byte (bytes outnumber characters only in k)."""
    non_ascii = [i for i, c in enumerate(choices) if not c.isascii()]
    k = gold if gold in non_ascii else non_ascii[0]
    m = gold if k != gold else next(i for i, c in enumerate(choices) if c.isascii())
    chars, nbytes = len(choices[k]), len(choices[k].encode("utf-8"))
    lls = np.array([-100.0 * len(c) for c in choices])  # every other choice far behind
    lls[m] = -1.0 * len(choices[m])
    lls[k] = -(1.0 + (nbytes / chars - 1) / 2) * chars
    assert np.argmax(lls / [len(c) for c in choices]) == m
    assert np.argmax(lls / [len(c.encode("utf-8")) for c in choices]) == k
    return lls


def test_acc_norm_divides_by_characters_not_bytes():
    choices = (" a café au lait", " a black coffee")
    for label, expected in ((1, 1.0), (0, 0.0)):
        lls = disagreeing_loglikelihoods(list(choices), gold=1)
        example = Example("norm", 0, tuple(("Order", c) for c in choices), choices, label, "acc_norm")
        assert correctness([example], lls, np.zeros(2, dtype=bool)).tolist() == [expected]


@pytest.mark.parametrize("doc_id", [6053, 9372])
def test_acc_norm_equals_lm_evals_process_results_on_non_ascii_hellaswag(builtin_examples, lm_eval_docs, doc_id):
    task, docs = lm_eval_docs("hellaswag")
    doc = docs[doc_id]
    example = builtin_examples("hellaswag")[doc_id]
    assert list(example.choices) == task.doc_to_choice(doc)
    lls = disagreeing_loglikelihoods(list(example.choices), example.label)
    expected = task.process_results(doc, [(float(ll), False) for ll in lls])["acc_norm"]
    by_bytes = float(np.argmax(lls / [len(c.encode("utf-8")) for c in example.choices]) == example.label)
    assert by_bytes != expected  # the document tells the two normalisations apart
    assert correctness([example], lls, np.zeros(len(lls), dtype=bool)).tolist() == [expected]
