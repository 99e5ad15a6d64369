"""lm-evaluation-harness under steering: simple_evaluate on a tiny model loaded by this project, with
and without steering; lm-eval's per-document log-likelihoods equal this project's scoring of the same
requests on the same (steered) model."""

import json

import numpy as np
import pytest

from delta_steering.data import harness
from delta_steering.errors import UsageError
from delta_steering.engine.scoring import encode_pair, loglikelihoods
from delta_steering.model.steering import steer
from delta_steering.options import EvaluateOptions
from delta_steering.steps.evaluate import run_harness


def write_piqa(folder, n=6):
    (folder / "piqa").mkdir(parents=True, exist_ok=True)
    rows = [{"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Paint the lid blue.",
             "label": i % 2} for i in range(n)]
    (folder / "piqa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def logprobs_of(samples) -> dict:
    """(doc_id, choice) -> lm-eval's log-likelihood, and the requests it scored."""
    out = {}
    for sample in samples:
        for k, (arguments, response) in enumerate(zip(sample["arguments"], sample["resps"])):
            out[(sample["doc_id"], k)] = (tuple(arguments[:2]), float(response[0][0]))
    return out


def test_simple_evaluate_sees_steering_and_equals_project_scoring(tiny_model, tokenizer, tmp_path):
    data = write_piqa(tmp_path)
    runs = {}
    for name, steering in (("plain", None), ("steered", (20, list(range(16)), 0.1))):
        handle = steer(tiny_model, *steering) if steering else None
        try:
            options = EvaluateOptions(tasks=["piqa"], data_dir=str(data), num_fewshot=0, batch_size=4, seed=0)
            result = run_harness(tiny_model, tokenizer, options, steerings=[])
            runs[name] = logprobs_of(result["samples"]["piqa"])
            pairs = [request for request, _ in runs[name].values()]
            ours, _ = loglikelihoods(tiny_model, tokenizer, [encode_pair(tokenizer, c, t) for c, t in pairs])
        finally:
            if handle:
                handle.remove()
        theirs = np.array([value for _, value in runs[name].values()])
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)  # the same numbers on the same model
        assert result["results"]["piqa"]["acc,none"] is not None
    assert len(runs["plain"]) == 12
    change = [abs(runs["steered"][k][1] - runs["plain"][k][1]) for k in runs["plain"]]
    assert max(change) > 1e-3  # steering reaches lm-eval's forward passes


def test_unknown_and_missing_tasks_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown task 'no_such_benchmark'"):
        harness.check_names(["no_such_benchmark"])
    with pytest.raises(UsageError, match="piqa/validation.jsonl not found"):
        harness.check_names(["piqa"], str(tmp_path))
