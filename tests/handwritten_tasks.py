"""The six tasks of the original study built by hand from their Hub-schema documents, as this
project built them before it took tasks from lm-evaluation-harness itself: the reference that the
harness-built tasks must reproduce request for request and metric for metric."""

import re
from dataclasses import dataclass
from typing import Callable

from delta_steering.results_io import read_jsonl
from delta_steering.data.tasks import Example


def _multiple_choice(context: str, choices: list[str]) -> tuple:
    """lm-eval's multiple_choice requests: context, then " " + choice (the target delimiter)."""
    return tuple((context, " " + c) for c in choices)


def _lambada(doc: dict):
    words = doc["text"].split(" ")
    target = words[-1]
    return ((" ".join(words[:-1]), " " + target),), (target,), 0


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict):
    context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    choices = [_hellaswag_clean(e) for e in doc["endings"]]
    return _multiple_choice(context, choices), tuple(choices), int(doc["label"])


def _piqa(doc: dict):
    choices = [doc["sol1"], doc["sol2"]]
    return _multiple_choice(f"Question: {doc['goal']}\nAnswer:", choices), tuple(choices), int(doc["label"])


def _arc(doc: dict):
    choices = list(doc["choices"]["text"])
    label = list(doc["choices"]["label"]).index(doc["answerKey"])
    return _multiple_choice(f"Question: {doc['question']}\nAnswer:", choices), tuple(choices), label


def _winogrande(doc: dict):
    """Partial scoring: the contexts differ (sentence up to the blank, filled with each option) and
    the shared continuation after the blank is scored."""
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
    target = " " + doc["sentence"][blank + 1:].strip()
    return tuple((c, target) for c in contexts), tuple(contexts), {"1": 0, "2": 1}[doc["answer"]]


@dataclass(frozen=True)
class TaskSpec:
    hub_path: str
    hub_name: str | None
    split: str
    metric: str
    build: Callable[[dict], tuple]


BUILTIN_TASKS = {
    "lambada_openai": TaskSpec("EleutherAI/lambada_openai", "default", "test", "greedy", _lambada),
    "hellaswag": TaskSpec("Rowan/hellaswag", None, "validation", "acc_norm", _hellaswag),
    "piqa": TaskSpec("baber/piqa", None, "validation", "acc", _piqa),
    "arc_easy": TaskSpec("allenai/ai2_arc", "ARC-Easy", "test", "acc", _arc),
    "arc_challenge": TaskSpec("allenai/ai2_arc", "ARC-Challenge", "test", "acc_norm", _arc),
    "winogrande": TaskSpec("allenai/winogrande", "winogrande_xl", "validation", "acc", _winogrande),
}




def handwritten_examples(name: str, data_file: str, limit: int | None = None) -> list[Example]:
    """The first `limit` documents of a local Hub-schema file as hand-built Examples."""
    spec = BUILTIN_TASKS[name]
    examples = []
    for doc_id, doc in enumerate(read_jsonl(data_file)[:limit]):
        requests, choices, label = spec.build(doc)
        examples.append(Example(name, doc_id, requests, choices, label, spec.metric))
    return examples
