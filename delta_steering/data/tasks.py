"""Zero-shot tasks as lm-evaluation-harness builds them, and their fixed-seed partitions.

Each document becomes an `Example`: one (context, continuation) request per choice, the gold label
and the metric. A task name (any lm-eval task, tag or group whose requests are log-likelihoods) is
built by lm-eval's own task objects: its prompts, choices and target delimiter, zero-shot, from the
Hub or from `--data_dir DIR/<task>/<split>.jsonl` in the Hub dataset's schema. `name:metric` picks
acc or acc_norm; by default the original study's metric for its six tasks, and for other tasks
acc_norm when the task's YAML lists it, else acc. A `.jsonl` path is a custom task of
{"context", "choices", "label"} lines (metric acc, each choice appended to the context verbatim).

Every pool is shuffled with a fixed seed: its first half is the *discovery* partition (step 1), the
second the *held-out* partition (step 2), so no step evaluates on the examples another selected on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from ..results_io import read_jsonl, warn
from . import harness

PARTITION_SEED = 1234  # fixed, independent of --seed: the discovery/held-out split never moves
# the original study's metric for each of its tasks (lambada: every target token greedy)
STUDY_METRICS = {"lambada_openai": "greedy", "hellaswag": "acc_norm", "piqa": "acc", "arc_easy": "acc",
                 "arc_challenge": "acc_norm", "winogrande": "acc"}
METRICS = ("acc", "acc_norm")


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
    """A pool of documents, each turned into an Example only when a partition asks for it."""

    name: str
    size: int
    example: Callable[[int], Example]  # document index -> Example

    @property
    def examples(self) -> list[Example]:
        return [self.example(i) for i in range(self.size)]


def metric_of(task, requested: str | None) -> str:
    """The metric an lm-eval task is scored with: greedy for loglikelihood tasks (lambada), else the
    requested one, the original study's, or acc_norm when the task lists it, else acc."""
    if task.OUTPUT_TYPE == "loglikelihood":
        return "greedy"
    listed = [m["metric"] for m in (task.config.metric_list or [])]
    if requested is not None:
        if requested not in METRICS:
            raise UsageError(f"task {task.task_name}: unknown metric {requested!r}; use {' or '.join(METRICS)}")
        return requested
    return STUDY_METRICS.get(task.task_name) or ("acc_norm" if "acc_norm" in listed else "acc")


def harness_example(task, docs, metric: str, doc_id: int) -> Example:
    """Document `doc_id` of an lm-eval task as lm-eval builds its requests, zero-shot."""
    try:
        return _harness_example(task, docs[doc_id], metric, doc_id)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise UsageError(f"task {task.task_name} document {doc_id} does not fit the task's schema: "
                         f"{type(e).__name__}: {e}") from None


def _harness_example(task, doc: dict, metric: str, doc_id: int) -> Example:
    context = task.fewshot_context(doc, num_fewshot=0)
    instances = task.construct_requests(doc=doc, ctx=context, metadata=(task.task_name, doc_id, 1))
    instances = instances if isinstance(instances, list) else [instances]
    if task.OUTPUT_TYPE == "loglikelihood":
        context, target = instances[0].arguments[:2]
        return Example(task.task_name, doc_id, ((context, target),), (target,), 0, metric)
    choices = tuple(task.doc_to_choice(doc))
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    gold = choices.index(gold) if isinstance(gold, str) else gold
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise UsageError(f"task {task.task_name} document {doc_id}: not one gold choice ({gold!r})")
    requests = tuple(tuple(i.arguments[:2]) for i in instances[: len(choices)])
    return Example(task.task_name, doc_id, requests, choices, gold, metric)


def harness_tasks(spec: str, data_dir: str | None) -> list[Task]:
    """The leaf tasks of `name[:metric]`, lm-eval task, tag or group."""
    name, _, metric = spec.partition(":")
    tasks = []
    for task in harness.load_tasks([name], data_dir).values():
        if task.multiple_target:
            raise UsageError(f"task {task.task_name} has several gold answers per document; not supported")
        docs = task.eval_docs
        tasks.append(Task(task.task_name, len(docs),
                          lambda i, t=task, d=docs, m=metric_of(task, metric or None): harness_example(t, d, m, i)))
    return tasks


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
        if len(choices) < 2:
            raise UsageError(f"task file {path} line {doc_id + 1}: one choice only; a multiple-choice item needs at "
                             "least 2 (with one, every answer is right)")
        examples.append(Example(name, doc_id, tuple((context, c) for c in choices), tuple(choices), label, "acc"))
    return Task(name, len(examples), examples.__getitem__)


def load_tasks(spec: str, data_dir: str | None = None) -> list[Task]:
    """A custom task file by path, or the leaf tasks of an lm-eval task, tag or group name."""
    if spec.endswith(".jsonl"):
        if Path(spec).is_dir():
            raise UsageError(f"task file {spec} is a directory, not a .jsonl file")
        if not Path(spec).is_file():
            raise UsageError(f"task file not found: {spec}")
        return [_custom_task(Path(spec))]
    return harness_tasks(spec, data_dir)


def load_task(spec: str, data_dir: str | None = None) -> Task:
    """One task (a custom file or an lm-eval task name)."""
    tasks = load_tasks(spec, data_dir)
    if len(tasks) != 1:
        raise UsageError(f"{spec} is a group of {len(tasks)} tasks, not one task")
    return tasks[0]


def partition_ids(size: int, which: str) -> list[int]:
    """The documents of the discovery (first half) or held-out (second half) partition of a fixed-seed
    shuffle of a pool of `size`: no step evaluates on the examples an earlier step selected on."""
    if which not in ("discovery", "heldout"):
        raise ValueError(f"unknown partition {which!r}")
    order = list(range(size))
    random.Random(PARTITION_SEED).shuffle(order)
    half = size // 2
    return order[:half] if which == "discovery" else order[half:]


def partition(task: Task, which: str, n: int | None = None) -> list[Example]:
    """The first `n` examples (all if None) of partition `which` of a task (see partition_ids); a
    warning line when the partition has fewer."""
    ids = partition_ids(task.size, which)
    if n is not None and len(ids) < n:
        warn(f"task {task.name} has {len(ids)} {which} examples; using {len(ids)}, not {n}")
    return [task.example(i) for i in ids[:n]]


def load_examples(tasks: list[str], data_dir: str | None, which: str, n: int) -> list[Example]:
    """The first `n` examples of partition `which` of each task, concatenated task by task."""
    if n < 1:
        raise UsageError(f"the number of examples per task must be at least 1, got {n}")
    named: dict[str, str] = {}  # task name -> the spec that brought it: a group and its member, two files' stems
    loaded = [(spec, task) for spec in tasks for task in load_tasks(spec, data_dir)]
    for spec, task in loaded:
        if task.name in named:
            raise UsageError(f"--tasks gives task {task.name} twice ({named[task.name]} and {spec}): its examples "
                             "would count twice")
        named[task.name] = spec
    return [e for _, task in loaded for e in partition(task, which, n)]


def task_names(examples: list[Example]) -> list[str]:
    """Task names in first-seen order."""
    return list(dict.fromkeys(e.task for e in examples))


def example_ids(examples: list[Example]) -> list[dict]:
    """Which examples a result was measured on: {"task", "index"}, index being the document's row in
    the dataset split or the custom file."""
    return [{"task": e.task, "index": e.doc_id} for e in examples]
