"""Step 3's model runs: a configuration's greedy generations on the IFEval prompts and its Pile
document losses, with its steering installed."""

from __future__ import annotations

import time

from ..analysis.metrics import perplexity_of
from ..analysis.verification import Outcome
from ..data.ifeval import score_responses
from ..engine.generation import generate_greedy
from ..engine.perplexity import document_losses
from ..intervention import Steering
from ..model.steering import apply


def run_configuration(model, tokenizer, steering: Steering, prompts: list[dict], texts: list[str] | None,
                      max_new_tokens: int, batch_size: int | None) -> Outcome:
    """Generate for every prompt with the configuration's steering active, score, measure perplexity."""
    started = time.time()
    with apply(model, steering):
        responses = generate_greedy(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens, batch_size,
                                    progress=True)
        losses = document_losses(model, tokenizer, texts, batch_size=batch_size, progress=True) if texts else None
    return Outcome(responses, score_responses(prompts, responses), None if losses is None else perplexity_of(losses),
                   round(time.time() - started, 2), losses)
