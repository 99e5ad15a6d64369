"""The fast sweep engine against the naive one (weight-editing `steer` + a full forward per neuron),
and the attribution estimate against finite differences of the exact engine."""

import copy

import numpy as np
import pytest
import torch

from delta_steering.engine.attribution import attribution
from delta_steering.engine.batching import context_groups
from delta_steering.model.delta_stats import delta_statistics
from delta_steering.engine.fast_sweep import fast_loglikelihoods, fast_loglikelihoods_layers
from delta_steering.intervention import Intervention
from delta_steering.analysis.metrics import correctness
from delta_steering.engine.scoring import loglikelihoods
from delta_steering.model.steering import install
from delta_steering.engine.sweep import layer_sweeps, sweep_correctness, sweep_correctness_layers, sweep_loglikelihoods
from tiny import make_model

NEURONS = [0, 13, 31]
LAYERS = [0, 10, 20, 23]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def means(tiny_model, tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog.", "Question: What is the capital of France?"]
    return {layer: tuple(float(v) for v in delta_statistics(tiny_model, tokenizer, texts, layer)["dt_pre_mean"])
            for layer in LAYERS}


ALL = list(range(32))


def interventions(means, layer, neurons=NEURONS):
    return {"zero": Intervention.scale(neurons, 0.0), "scale": Intervention.scale(neurons, 3.0),
            "mean": Intervention.ablation("mean", neurons, means[layer])}


def test_shared_contexts_are_found(encoded):
    sizes = sorted(len(g) for g in context_groups(encoded))
    assert sizes == [1, 1, 2, 3, 3, 3]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", ["zero", "scale", "mean"])
def test_fast_equals_naive(tiny_model, tokenizer, examples, encoded, means, layer, kind):
    intervention = interventions(means, layer)[kind]
    naive_lp, naive_greedy = sweep_loglikelihoods(tiny_model, tokenizer, encoded, layer, intervention, engine="naive")
    fast_lp, fast_greedy = sweep_loglikelihoods(tiny_model, tokenizer, encoded, layer, intervention, engine="fast")
    assert fast_lp.shape == fast_greedy.shape == (len(NEURONS), len(encoded))
    np.testing.assert_allclose(fast_lp, naive_lp, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(fast_greedy, naive_greedy)
    for a, g, b, h in zip(naive_lp, naive_greedy, fast_lp, fast_greedy):
        np.testing.assert_array_equal(correctness(examples, a, g), correctness(examples, b, h))
    base, _ = loglikelihoods(tiny_model, tokenizer, encoded)
    assert np.abs(naive_lp - base).max() > 1e-3  # the interventions do change the scores


def test_sweep_correctness_identical(tiny_model, tokenizer, examples):
    intervention = Intervention.scale(NEURONS, 0.0)
    naive = sweep_correctness(tiny_model, tokenizer, examples, 20, intervention, engine="naive")
    fast = sweep_correctness(tiny_model, tokenizer, examples, 20, intervention, engine="fast")
    np.testing.assert_array_equal(fast, naive)


def test_several_layers_share_one_prefix_and_equal_each_layer_alone(tiny_model, tokenizer, examples, encoded, means):
    """Layers 20, 0 and 10 (and one with no neuron) in one sweep: each layer's numbers equal its own
    sweep's, for either way of reading contexts, and the naive engine's correctness."""
    chosen = {20: interventions(means, 20)["zero"], 0: interventions(means, 0)["mean"],
              10: interventions(means, 10, [5])["scale"], 23: Intervention.scale([], 0.0)}
    for share in (True, False):
        together = fast_loglikelihoods_layers(tiny_model, tokenizer, encoded, chosen, batch_size=4,
                                              share_contexts=share)
        assert list(together) == list(chosen) and together[23][0].shape == (0, len(encoded))
        for layer, intervention in chosen.items():
            alone = fast_loglikelihoods(tiny_model, tokenizer, encoded, layer, intervention, share_contexts=share)
            np.testing.assert_allclose(together[layer][0], alone[0], rtol=0, atol=1e-4)
            np.testing.assert_array_equal(together[layer][1], alone[1])
    rows = sweep_correctness_layers(tiny_model, tokenizer, examples, {k: chosen[k] for k in (0, 10)}, engine="naive")
    fast = sweep_correctness_layers(tiny_model, tokenizer, examples, {k: chosen[k] for k in (0, 10)})
    for layer in (0, 10):
        np.testing.assert_array_equal(fast[layer], rows[layer])


def test_layer_sweeps_take_chunk_k_of_every_layer(tiny_model, tokenizer, examples):
    """Work items of chunks of 2: item k holds chunk k of each layer that has one; together every
    neuron once, each row the neuron's own sweep's."""
    neurons = {20: [0, 13, 31, 7, 2], 3: [4, 5]}
    ablations = {layer: Intervention.scale(range(32), 0.0) for layer in neurons}
    work = layer_sweeps(tiny_model, tokenizer, examples, neurons, ablations, 2, progress=False)
    assert list(work) == ["neurons/chunk0", "neurons/chunk1", "neurons/chunk2"]
    items = {name: item() for name, item in work.items()}
    assert [(r["layer"], r["neuron"]) for r in items["neurons/chunk0"]] == [(20, 0), (20, 13), (3, 4), (3, 5)]
    assert [(r["layer"], r["neuron"]) for r in items["neurons/chunk2"]] == [(20, 2)]
    merged = {f"{r['layer']}/{r['neuron']}": r["correct"] for item in items.values() for r in item}
    assert sorted(merged) == sorted(f"{layer}/{n}" for layer, ns in neurons.items() for n in ns)
    for layer, listed in neurons.items():
        alone = sweep_correctness(tiny_model, tokenizer, examples, layer, ablations[layer].only(listed))
        np.testing.assert_array_equal(np.array([merged[f"{layer}/{n}"] for n in listed]), alone)


def test_fast_is_independent_of_batch_size_and_context_sharing(tiny_model, tokenizer, encoded):
    intervention = Intervention.scale(NEURONS, 0.0)
    reference_lp, reference_greedy = fast_loglikelihoods(tiny_model, tokenizer, encoded, 20, intervention)
    for batch_size, share in [(2, True), (5, False), (None, False)]:
        lp, greedy = fast_loglikelihoods(tiny_model, tokenizer, encoded, 20, intervention, batch_size,
                                         share_contexts=share)
        np.testing.assert_allclose(lp, reference_lp, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(greedy, reference_greedy)


def test_fast_races_each_new_shape_and_follows_the_recorded_choice(tiny_model, tokenizer, encoded, monkeypatch):
    """A fresh model: every shape of context group is read both ways once (the faster recorded for
    the model's fast engine, whatever the layer), with the same numbers as either way; a recorded
    choice is then followed, at another layer too."""
    import delta_steering.engine.fast_sweep as fast_sweep
    from delta_steering.engine.reading import ReadingChoice, choice_for, group_shape

    model = copy.deepcopy(tiny_model)
    intervention = Intervention.scale(NEURONS, 0.0)
    raced = fast_loglikelihoods(model, tokenizer, encoded, 20, intervention)
    groups = [g for g in context_groups(encoded) if len(g) > 1]
    choice = choice_for(model, "fast sweep")
    assert set(choice.shared) == {group_shape(encoded, g) for g in groups}
    with monkeypatch.context() as patch:
        patch.setattr(ReadingChoice, "race", lambda *_: pytest.fail("a recorded shape raced again at another layer"))
        fast_loglikelihoods(model, tokenizer, encoded, 10, intervention)
    for forced in (True, False):
        lp, greedy = fast_loglikelihoods(model, tokenizer, encoded, 20, intervention, share_contexts=forced)
        np.testing.assert_allclose(raced[0], lp, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(raced[1], greedy)

    def refused(*_args, **_kwargs):
        raise AssertionError("read the way the recorded choice rules out")

    grouped = [encoded[i] for g in groups for i in g]
    for shared, ruled_out in ((False, "continuation_hidden"), (True, "blocks_from")):
        choice.shared.update({shape: shared for shape in choice.shared})
        with monkeypatch.context() as patch:
            patch.setattr(fast_sweep, ruled_out, refused)
            lp, _ = fast_loglikelihoods(model, tokenizer, grouped, 20, intervention)
        np.testing.assert_allclose(lp, raced[0][:, [i for g in groups for i in g]], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_equals_naive_in_half_precision(tokenizer, encoded, dtype):
    """Half-precision weights (the scan and the rank-1 correction stay in float32): agreement to
    half-precision rounding, identical greedy flags."""
    model = make_model(tokenizer).to(dtype)
    intervention = Intervention.scale(NEURONS, 0.0)
    naive_lp, naive_greedy = sweep_loglikelihoods(model, tokenizer, encoded, 20, intervention, engine="naive")
    fast_lp, fast_greedy = sweep_loglikelihoods(model, tokenizer, encoded, 20, intervention, engine="fast")
    np.testing.assert_allclose(fast_lp, naive_lp, rtol=2e-3, atol=1e-2)
    np.testing.assert_array_equal(fast_greedy, naive_greedy)


def test_fast_reports_non_finite_logits_as_nan(tiny_model, tokenizer, encoded):
    lp, greedy = fast_loglikelihoods(tiny_model, tokenizer, encoded, 20, Intervention.scale([3], float("inf")))
    naive_lp, _ = sweep_loglikelihoods(tiny_model, tokenizer, encoded, 20, Intervention.scale([3], float("inf")),
                                       engine="naive")
    np.testing.assert_array_equal(np.isnan(lp), np.isnan(naive_lp))
    assert not greedy[np.isnan(lp)].any()


def test_fast_checks_its_arguments(tiny_model, tokenizer, encoded):
    with pytest.raises(ValueError, match="out of range"):
        fast_loglikelihoods(tiny_model, tokenizer, encoded, 24, Intervention.scale([0], 0.0))
    with pytest.raises(ValueError, match="out of range"):
        fast_loglikelihoods(tiny_model, tokenizer, encoded, 0, Intervention.scale([32], 0.0))
    with pytest.raises(ValueError, match="mean"):
        fast_loglikelihoods(tiny_model, tokenizer, encoded, 0, Intervention.ablation("mean", [1]))


# --- attribution --------------------------------------------------------------------------------


# --- other families ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mamba2_models(tokenizer):
    """Tiny 4-layer Mamba-2 models with one group and two groups of heads."""
    from families import make_tiny

    return {groups: make_tiny("mamba2", vocab_size=len(tokenizer), num_hidden_layers=4, n_groups=groups)
            for groups in (1, 2)}


MAMBA2_INTERVENTIONS = (Intervention.scale([0, 1, 2, 3], 0.0), Intervention.scale([0, 1, 2, 3], 0.5),
                        Intervention.scale([0, 1, 2, 3], 3.0), Intervention.set([0, 3], [-2.0, 1.5]))


def assert_fast_equals_naive(model, tokenizer, encoded, layer, intervention, **fast_options):
    """The fast engine's log-probs within float rounding of the naive engine's, greedy flags equal,
    on requests of different lengths padded into one batch; returns the naive log-probs."""
    naive_lp, naive_greedy = sweep_loglikelihoods(model, tokenizer, encoded, layer, intervention, engine="naive")
    fast_lp, fast_greedy = fast_loglikelihoods(model, tokenizer, encoded, layer, intervention, **fast_options)
    np.testing.assert_allclose(fast_lp, naive_lp, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(fast_greedy, naive_greedy)
    return naive_lp


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_mamba2_fast_equals_naive(mamba2_models, tokenizer, encoded, groups, layer):
    """A head's new scan and the gated RMSNorm's rescaling of its group, on the first, a middle and
    the last layer, for scaling (zero, 0.5, 3) and setting dt_pre."""
    model = mamba2_models[groups]
    base, _ = loglikelihoods(model, tokenizer, encoded)
    for intervention in MAMBA2_INTERVENTIONS:
        naive_lp = assert_fast_equals_naive(model, tokenizer, encoded, layer, intervention)
        assert np.abs(naive_lp - base).max() > 1e-3  # the intervention does change the scores


@pytest.mark.parametrize("batch_size, share", [(1, True), (None, False), (3, True)])
def test_mamba2_fast_is_independent_of_batch_size_and_context_sharing(mamba2_models, tokenizer, encoded,
                                                                      batch_size, share):
    assert_fast_equals_naive(mamba2_models[2], tokenizer, encoded, 1, MAMBA2_INTERVENTIONS[2],
                             batch_size=batch_size, share_contexts=share)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mamba2_fast_is_as_exact_as_naive_in_half_precision(mamba2_models, tokenizer, encoded, dtype):
    """Half-precision weights (the head's scan and the corrections stay in float32): the fast
    engine's log-probs are no further from the float32 model's than the naive engine's own rounding
    takes them, and the greedy flags equal the naive engine's."""
    intervention = MAMBA2_INTERVENTIONS[1]
    exact, _ = sweep_loglikelihoods(mamba2_models[2], tokenizer, encoded, 1, intervention, engine="naive")
    model = copy.deepcopy(mamba2_models[2]).to(dtype)
    naive_lp, naive_greedy = sweep_loglikelihoods(model, tokenizer, encoded, 1, intervention, engine="naive")
    fast_lp, fast_greedy = fast_loglikelihoods(model, tokenizer, encoded, 1, intervention)
    rounding = np.abs(naive_lp - exact).max()
    assert 0 < np.abs(fast_lp - exact).max() <= 1.5 * rounding
    np.testing.assert_array_equal(fast_greedy, naive_greedy)


def test_mamba2_time_step_limit_still_shares_contexts_exactly(tokenizer, encoded):
    """Continuations go through the chunked scan, which clamps dt to `time_step_limit` (transformers'
    one-token cached step would not): with a limit the fast engine still shares contexts and equals
    the naive engine."""
    from delta_steering.model.continuation import continues_exactly
    from families import make_tiny

    model = make_tiny("mamba2", vocab_size=len(tokenizer), num_hidden_layers=3, time_step_limit=(0.05, 0.8))
    assert continues_exactly(model)
    for intervention in MAMBA2_INTERVENTIONS[::3]:
        assert_fast_equals_naive(model, tokenizer, encoded, 1, intervention)


def test_hybrids_run_the_naive_engine(tokenizer, encoded, capsys):
    from delta_steering.engine.sweep import engine_for
    from families import make_tiny

    model = make_tiny("bamba", vocab_size=len(tokenizer))
    assert engine_for(model, "fast") == "naive"
    assert capsys.readouterr().out.strip().endswith("this bamba model runs the naive engine (the same results, "
                                                    "the whole model per neuron)")
    assert engine_for(model, "naive") == "naive"
    with pytest.raises(ValueError, match="fast engine covers"):
        fast_loglikelihoods(model, tokenizer, encoded, 0, Intervention.scale([0], 0.0))
    lp, _ = sweep_loglikelihoods(model, tokenizer, encoded, 0, Intervention.scale([0, 3], 0.0), engine="naive")
    assert lp.shape == (2, len(encoded)) and np.isfinite(lp).all()


def test_attribution_stays_mamba1(mamba2_models, tokenizer, examples, encoded):
    with pytest.raises(ValueError, match="attribution covers mamba, falcon_mamba models, not mamba2"):
        attribution(mamba2_models[1], tokenizer, examples, encoded, 0, Intervention.scale(range(4), 0.0))


def test_mamba2_on_cpu_scans_in_short_chunks_with_the_same_numbers(tokenizer, encoded):
    """mamba2's configured chunk of 256 would pad these short requests to 256 tokens: while scoring
    and sweeping, the mixers scan in chunks fitted to the longest request (32 here), and the numbers
    equal those of the configured chunk size up to float rounding; afterwards it is restored."""
    from delta_steering.model.mamba2 import chunk_size_for
    from families import make_tiny
    from delta_steering.model.sites import decoder_layers

    model = make_tiny("mamba2", vocab_size=len(tokenizer), num_hidden_layers=3, chunk_size=256)
    seen = set()
    hooks = [block.mixer.register_forward_pre_hook(lambda mixer, _a: seen.add(mixer.chunk_size))
             for block in decoder_layers(model)]
    longest = max(len(e.tokens) for e in encoded)
    assert longest <= 128 and chunk_size_for(longest, 256) == 32
    intervention = MAMBA2_INTERVENTIONS[2]
    short = loglikelihoods(model, tokenizer, encoded), fast_loglikelihoods(model, tokenizer, encoded, 1, intervention)
    assert seen == {32}
    for hook in hooks:
        hook.remove()
    assert {block.mixer.chunk_size for block in decoder_layers(model)} == {256}
    configured = make_tiny("mamba2", vocab_size=len(tokenizer), num_hidden_layers=3, chunk_size=256)
    configured.load_state_dict(model.state_dict())
    with torch.no_grad():  # the reference: transformers' own forward, at the configured chunk size
        reference = [naive_request(configured, e) for e in encoded]
    np.testing.assert_allclose(short[0][0], [r[0] for r in reference], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(short[0][1], [r[1] for r in reference])
    for row, neuron in enumerate(intervention.neurons):
        with install(configured, 1, intervention.only([neuron])), torch.no_grad():
            steered = [naive_request(configured, e) for e in encoded]
        np.testing.assert_allclose(short[1][0][row], [r[0] for r in steered], rtol=0, atol=1e-4)
        np.testing.assert_array_equal(short[1][1][row], [r[1] for r in steered])


def naive_request(model, e) -> tuple[float, bool]:
    """Summed log-prob and greedy flag of one request from a plain forward of its tokens."""
    ids = torch.tensor([e.tokens[:-1]])
    logp = torch.log_softmax(model(ids).logits[0, -e.n_target:].float(), -1)
    target = torch.tensor(e.tokens[-e.n_target:])
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())
