"""lm-evaluation-harness as the source of tasks, and the shape of its results.

Tasks: any lm-eval task, tag or group name is built by lm-eval's own `TaskManager` and task objects
(prompts, answer choices, metrics). Offline, `--data_dir DIR` serves `DIR/<task>/<split>.jsonl` in
the Hub dataset's schema: each such task is registered again through a small YAML that includes
the original one and points its dataset at the local files, so groups and tags resolve to them too.

Benchmarks run under steering in `steps.evaluate`; here are the tasks they build (`benchmark_tasks`)
and the reading of lm-eval's results (`results_json`, `per_document`).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

import yaml

from ..errors import UsageError

SCORED_TYPES = ("multiple_choice", "loglikelihood")  # what steps 1 and 2 can score by log-likelihood
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def quiet() -> None:
    """lm-eval logs every task it builds at INFO; keep the console for the steps' own output."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


@functools.lru_cache(maxsize=1)
def default_manager():
    """lm-eval's TaskManager over its own task YAMLs (indexing them takes several seconds: once)."""
    from lm_eval.tasks import TaskManager

    quiet()
    return TaskManager()


def eval_split(entry) -> str | None:
    """The split lm-eval evaluates on: test if the task has one, else validation."""
    config = entry.cfg or {}
    return config.get("test_split") or config.get("validation_split")


def _local_override(entry, data_dir: Path, out_dir: Path) -> None:
    """`out_dir/<task>.yaml`: the task's own YAML (included) with its dataset read from
    `data_dir/<task>/<split>.jsonl`; splits without a file are dropped."""
    files = {p.stem: str(p.resolve()) for p in sorted((data_dir / entry.name).glob("*.jsonl"))}
    config = entry.cfg or {}
    override = {"include": str(entry.yaml_path), "task": entry.name, "tag": [], "dataset_path": "json",
                "dataset_name": None, "dataset_kwargs": {"data_files": files},
                **{k: (config[k] if config[k] in files else None) for k in SPLIT_KEYS if k in config}}
    (out_dir / f"{entry.name}.yaml").write_text(yaml.safe_dump(override, sort_keys=False))


@functools.lru_cache(maxsize=16)
def local_manager(data_dir: str, leaves: tuple[str, ...], only_tasks: bool):
    """A TaskManager whose `leaves` read their files in `data_dir`. When every requested name is a
    plain task it indexes just those (fast); groups and tags need lm-eval's whole index beside them."""
    from lm_eval.tasks import TaskManager

    out = Path(tempfile.mkdtemp(prefix="delta_steering_tasks_"))
    for leaf in leaves:
        _local_override(default_manager().task_index[leaf], Path(data_dir), out)
    return TaskManager(include_path=str(out), include_defaults=not only_tasks)


def leaf_types(manager, name) -> dict[str, str]:
    """{leaf task: output_type} of a task, tag or group name, from lm-eval's index alone (no data is
    loaded). A YAML without output_type is generate_until, lm-eval's default."""
    if isinstance(name, dict):  # a group member written as a dict
        inner = name.get("group") or name.get("task")
        found = leaf_types(manager, inner) if isinstance(inner, str) and inner in manager.task_index else \
            {str(inner): "generate_until"}
        return {k: name.get("output_type", v) for k, v in found.items()}
    entry = manager.task_index.get(name)
    if entry is None:
        raise UsageError(f"unknown task {name!r}: neither a .jsonl file nor an lm-eval task, tag or group")
    config = entry.cfg or {}
    if entry.kind.name in ("TASK", "PY_TASK"):
        return {name: config.get("output_type", "generate_until")}
    members = sorted(entry.tags) if entry.kind.name == "TAG" else config.get("task") or []
    found = {}
    for member in members if isinstance(members, list) else [members]:
        found.update(leaf_types(manager, member))
    return {k: config.get("output_type", v) for k, v in found.items()}


def check_scorable(manager, name: str) -> list[str]:
    """The leaf tasks of `name`, or a UsageError when one of them is generative."""
    types = leaf_types(manager, name)
    bad = sorted(t for t, kind in types.items() if kind not in SCORED_TYPES)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UsageError(f"task {name}: {bad[0]}{more} has output_type {types[bad[0]]}; steps 1 and 2 score "
                         "log-likelihoods, so only multiple_choice and loglikelihood tasks can be used "
                         "(evaluate_steered.py runs any benchmark)")
    return sorted(types)


def check_local_files(leaves: list[str], data_dir: str) -> None:
    """Every leaf task has its evaluation split in `data_dir`."""
    for leaf in leaves:
        entry = default_manager().task_index[leaf]
        path = Path(data_dir) / leaf / f"{eval_split(entry)}.jsonl"
        if not path.is_file():
            raise UsageError(f"--data_dir has no file for task {leaf}: {path} not found")


def load_tasks(names: list[str], data_dir: str | None = None) -> dict:
    """{leaf task name: lm-eval task object} for task, tag or group names (groups expanded),
    generative tasks refused, local files used when `data_dir` is given."""
    leaves = [leaf for name in names for leaf in check_scorable(default_manager(), name)]
    manager = default_manager()
    if data_dir is not None:
        check_local_files(leaves, data_dir)
        only_tasks = all(default_manager().task_index[name].kind.name == "TASK" for name in names)
        manager = local_manager(str(Path(data_dir).resolve()), tuple(sorted(set(leaves))), only_tasks)
    try:
        tasks = manager.load(list(names))["tasks"]
    except Exception as e:  # the Hub unreachable, a dataset moved, a malformed local file
        where = "local files" if data_dir else "the Hub"
        raise UsageError(f"cannot load task(s) {', '.join(names)} from {where} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})"
                         + ("" if data_dir else "; pass --data_dir DIR with DIR/<task>/<split>.jsonl in the Hub "
                                                "dataset's schema")) from None
    generative = [t.task_name for t in tasks.values() if t.OUTPUT_TYPE not in SCORED_TYPES]
    if generative:
        raise UsageError(f"task {generative[0]} has output_type generate_until; only multiple_choice and "
                         "loglikelihood tasks can be used")
    return tasks


def benchmark_tasks(names: list[str], data_dir: str | None = None) -> dict:
    """{leaf task name: lm-eval task object} for any task, tag or group (generative ones included),
    with local files when `data_dir` is given."""
    manager = default_manager()
    leaves = [leaf for name in names for leaf in leaf_types(manager, name)]
    if data_dir is not None:
        check_local_files(leaves, data_dir)
        only_tasks = all(manager.task_index[name].kind.name == "TASK" for name in names)
        manager = local_manager(str(Path(data_dir).resolve()), tuple(sorted(set(leaves))), only_tasks)
    try:
        return manager.load(list(names))["tasks"]
    except Exception as e:
        raise UsageError(f"cannot load task(s) {', '.join(names)} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}); offline, pass --data_dir DIR with "
                         "DIR/<task>/<split>.jsonl in the Hub dataset's schema") from None


def check_names(names: list[str], data_dir: str | None = None) -> None:
    """Every name is an lm-eval task, tag or group (with its local files when `data_dir` is given)."""
    leaves = [leaf for name in names for leaf in leaf_types(default_manager(), name)]
    if data_dir is not None:
        check_local_files(leaves, data_dir)


def results_json(result: dict) -> dict:
    """lm-eval's results dict as JSON-ready data, without the per-document samples."""
    import json

    from lm_eval.utils import handle_non_serializable

    kept = {key: value for key, value in result.items() if key != "samples"}
    return json.loads(json.dumps(kept, default=handle_non_serializable))


def per_document(samples: list[dict], metric: str, filter_name: str) -> dict[int, float]:
    """doc_id -> a scalar metric of one filter's samples (the values lm-eval averaged)."""
    return {s["doc_id"]: float(s[metric]) for s in samples
            if s.get("filter", "none") == filter_name and isinstance(s.get(metric), (int, float, bool))}
