"""Zero-shot tasks as lm-evaluation-harness builds them, and their fixed-seed partitions.

Each document becomes an `Example`: one (context, continuation) request per choice, the gold label
and the metric (lm-eval's prompt text, target delimiter and metric for each built-in task). Built-in
tasks come from the Hub or from `--data_dir DIR/<task>/<split>.jsonl` in the Hub dataset's schema; a
`.jsonl` path is a custom task of {"context", "choices", "label"} lines (metric acc, each choice
appended to the context verbatim).

Every pool is shuffled with a fixed seed: its first half is the *discovery* partition (step 1), the
second the *held-out* partition (step 2), so no step evaluates on the examples another selected on.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UsageError
from .results_io import read_jsonl

PARTITION_SEED = 1234  # fixed, independent of --seed: the discovery/held-out split never moves


@dataclass(frozen=True)
class Example:
    """One document: a (context, continuation) request per choice, the gold choice and the metric."""

    task: str
    doc_id: int
    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    label: int
    metric: str  # "acc", "acc_norm" (log-prob per character of the choice, as lm-eval) or "greedy" (lambada)


@dataclass
class Task:
    name: str
    examples: list[Example]


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


def _hub_docs(name: str, spec: TaskSpec) -> list[dict]:
    from datasets import load_dataset

    try:
        return list(load_dataset(spec.hub_path, spec.hub_name, split=spec.split))
    except Exception as e:
        raise UsageError(
            f"cannot load task {name} from the Hub ({spec.hub_path}: {type(e).__name__}); pass --data_dir DIR "
            f"with DIR/{name}/{spec.split}.jsonl in the Hub schema") from None


def _builtin_task(name: str, data_dir: str | None) -> Task:
    spec = BUILTIN_TASKS[name]
    if data_dir is not None:
        path = Path(data_dir) / name / f"{spec.split}.jsonl"
        if not path.is_file():
            raise UsageError(f"--data_dir has no file for task {name}: {path} not found")
        docs, source = read_jsonl(path, "task file"), str(path)
    else:
        docs, source = _hub_docs(name, spec), spec.hub_path
    examples = []
    for doc_id, doc in enumerate(docs):
        try:
            requests, choices, label = spec.build(doc)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise UsageError(f"task {name} ({source}) document {doc_id + 1} does not fit the "
                             f"{spec.hub_path} schema: {type(e).__name__}: {e}") from None
        examples.append(Example(name, doc_id, requests, choices, label, spec.metric))
    if not examples:
        raise UsageError(f"task {name} ({source}) has no documents")
    return Task(name, examples)


def _custom_task(path: Path) -> Task:
    """A .jsonl of {"context": str, "choices": [str, ...], "label": int}: acc, choice appended verbatim."""
    name = path.stem
    rows = read_jsonl(path, "task file")
    if not rows:
        raise UsageError(f"task file {path} is empty")
    examples = []
    for doc_id, row in enumerate(rows):
        context, choices, label = row.get("context"), row.get("choices"), row.get("label")
        ok = (isinstance(context, str) and isinstance(choices, list) and len(choices) >= 1
              and all(isinstance(c, str) and c for c in choices)
              and isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices))
        if not ok:
            raise UsageError(f"task file {path} line {doc_id + 1}: expected {{\"context\": str, \"choices\": "
                             f"[non-empty str, ...], \"label\": int index into choices}}")
        requests = tuple((context, c) for c in choices)
        examples.append(Example(name, doc_id, requests, tuple(choices), label, "acc"))
    return Task(name, examples)


def load_task(name_or_path: str, data_dir: str | None = None) -> Task:
    """A built-in task by name, or a custom task file by path."""
    if name_or_path in BUILTIN_TASKS:
        return _builtin_task(name_or_path, data_dir)
    if name_or_path.endswith(".jsonl"):
        if not Path(name_or_path).is_file():
            raise UsageError(f"task file not found: {name_or_path}")
        return _custom_task(Path(name_or_path))
    raise UsageError(f"unknown task {name_or_path!r}: use one of {', '.join(BUILTIN_TASKS)} or a .jsonl file")


def partition(task: Task, which: str) -> list[Example]:
    """The discovery (first half) or held-out (second half) examples of a fixed-seed shuffle of the pool,
    built-in task or custom file alike: no step evaluates on the examples an earlier step selected on."""
    if which not in ("discovery", "heldout"):
        raise ValueError(f"unknown partition {which!r}")
    order = list(range(len(task.examples)))
    random.Random(PARTITION_SEED).shuffle(order)
    half = len(order) // 2
    chosen = order[:half] if which == "discovery" else order[half:]
    return [task.examples[i] for i in chosen]


def load_examples(tasks: list[str], data_dir: str | None, which: str, n: int) -> list[Example]:
    """The first `n` examples of partition `which` of each task, concatenated task by task."""
    if n < 1:
        raise UsageError(f"the number of examples per task must be at least 1, got {n}")
    examples = []
    for name in tasks:
        examples += partition(load_task(name, data_dir), which)[:n]
    return examples


def task_names(examples: list[Example]) -> list[str]:
    """Task names in first-seen order."""
    return list(dict.fromkeys(e.task for e in examples))


def example_ids(examples: list[Example]) -> list[dict]:
    """Which examples a result was measured on: {"task", "index"}, index being the document's row in
    the dataset split or the custom file."""
    return [{"task": e.task, "index": e.doc_id} for e in examples]
