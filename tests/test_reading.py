"""The measured choice between reading a shared context once and reading every request whole."""

import copy
import time

import pytest
import torch

from delta_steering.engine.batching import Encoded
from delta_steering.engine.reading import ReadingChoice, choice_for, length_class, group_shape


@pytest.mark.parametrize("tokens, expected", [(0, 0), (1, 1), (3, 1), (4, 2), (15, 2), (16, 3), (63, 3), (64, 4)])
def test_lengths_within_a_factor_of_four_share_a_class(tokens, expected):
    assert length_class(tokens) == expected


def test_a_groups_shape_is_its_size_and_the_classes_of_its_context_and_longest_continuation():
    context = tuple(range(1, 21))  # 20 tokens
    encoded = [Encoded(context + (7,), 1), Encoded(context + (5, 6, 7, 8, 9), 5), Encoded((1, 2), 1)]
    assert encoded[1].context_length == 20
    assert group_shape(encoded, [0, 1]) == (2, length_class(20), length_class(4)) == (2, 3, 2)


def slow(result, seconds):
    def read():
        time.sleep(seconds)
        return result
    return read


@pytest.mark.parametrize("shared_s, whole_s, expected", [(0.0, 0.2, True), (0.2, 0.0, False)])
def test_a_race_keeps_the_faster_way_and_returns_its_result(shared_s, whole_s, expected):
    choice = ReadingChoice([torch.device("cpu")])
    result = choice.race((4, 3, 2), slow("shared", shared_s), slow("whole", whole_s))
    assert choice.shared == {(4, 3, 2): expected}
    assert result == ("shared" if expected else "whole")


def test_choices_are_kept_per_model_use_and_dtype(tiny_model):
    model = copy.deepcopy(tiny_model)
    scoring = choice_for(model, "scoring")
    scoring.shared[(2, 1, 1)] = True
    assert choice_for(model, "scoring") is scoring
    assert choice_for(model, "fast sweep from layer 3").shared == {}
    assert choice_for(copy.deepcopy(tiny_model), "scoring").shared == {}
    model.to(torch.bfloat16)
    assert choice_for(model, "scoring").shared == {}
