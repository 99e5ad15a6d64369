"""Task construction: the (context, continuation) pairs of lm-evaluation-harness, the partition,
custom task files and their errors."""

import json
import os

import pytest

from delta_steering.cli import UsageError
from delta_steering.tasks import BUILTIN_TASKS, load_examples, load_task, partition

LM_EVAL_YAML = {
    "lambada_openai": "lambada/lambada_openai.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
}


def lm_eval_requests(name: str, data_file: str, limit: int) -> list[tuple[int, tuple[str, str]]]:
    """Build lm-eval's own task object offline from its YAML, pointed at a local json file."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    split = BUILTIN_TASKS[name].split
    config = load_yaml(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", LM_EVAL_YAML[name]))
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: data_file}},
                  training_split=None, validation_split=split if split == "validation" else None,
                  test_split=split if split == "test" else None)
    task = ConfigurableTask(config=config)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.doc_id, tuple(inst.arguments)) for inst in task.instances]


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_requests_equal_lm_eval(shared_data, name):
    data_dir = shared_data / "tasks_hf"
    split = BUILTIN_TASKS[name].split
    expected = lm_eval_requests(name, str(data_dir / name / f"{split}.jsonl"), limit=20)
    task = load_task(name, str(data_dir))
    ours = [(e.doc_id, pair) for e in task.examples[:20] for pair in e.requests]
    assert sorted(ours) == sorted(expected)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def hub_rows(name, n):
    if name == "piqa":
        return [{"goal": f"goal {i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(n)]
    if name == "winogrande":
        return [{"sentence": f"The {i} cat sat because _ was tired.", "option1": "it", "option2": "he",
                 "answer": "1"} for i in range(n)]
    raise ValueError(name)


def test_partition_is_fixed_disjoint_and_covers_the_pool(tmp_path):
    (tmp_path / "piqa").mkdir()
    write_jsonl(tmp_path / "piqa" / "validation.jsonl", hub_rows("piqa", 41))
    task = load_task("piqa", str(tmp_path))
    discovery, heldout = partition(task, "discovery"), partition(task, "heldout")
    ids_d, ids_h = {e.doc_id for e in discovery}, {e.doc_id for e in heldout}
    assert not ids_d & ids_h and len(ids_d | ids_h) == 41 and len(ids_d) == 20
    assert [e.doc_id for e in partition(load_task("piqa", str(tmp_path)), "discovery")] == [e.doc_id for e in discovery]
    assert [e.doc_id for e in discovery] != sorted(e.doc_id for e in discovery)  # shuffled
    first = load_examples(["piqa"], str(tmp_path), "heldout", 5)
    assert [e.doc_id for e in first] == [e.doc_id for e in heldout[:5]]


def test_winogrande_partial_scoring_and_piqa_prompt(tmp_path):
    for name in ("piqa", "winogrande"):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "validation.jsonl", hub_rows(name, 2))
    wino = load_task("winogrande", str(tmp_path)).examples[0]
    assert wino.requests == (("The 0 cat sat because it", " was tired."), ("The 0 cat sat because he", " was tired."))
    assert wino.label == 0 and wino.metric == "acc"
    piqa = load_task("piqa", str(tmp_path)).examples[1]
    assert piqa.requests == (("Question: goal 1\nAnswer:", " a"), ("Question: goal 1\nAnswer:", " b"))
    assert piqa.label == 1


def test_custom_task_file_in_order_without_partition(tmp_path):
    rows = [{"context": f"Key {i} is", "choices": [" red", " blue"], "label": i % 2} for i in range(6)]
    path = write_jsonl(tmp_path / "colors.jsonl", rows)
    task = load_task(path)
    assert task.name == "colors" and not task.partitioned
    assert [e.doc_id for e in partition(task, "heldout")] == list(range(6))
    assert task.examples[1].requests == (("Key 1 is", " red"), ("Key 1 is", " blue"))


@pytest.mark.parametrize("rows,match", [
    ([], "empty"),
    ([{"context": "a", "choices": ["x"], "label": 0}, {"context": "b", "choices": [], "label": 0}], "line 2"),
    ([{"context": "a", "choices": ["x", "y"], "label": 2}], "line 1"),
    ([{"choices": ["x"], "label": 0}], "line 1"),
])
def test_custom_task_errors_name_the_line(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UsageError, match=match):
        load_task(path)


def test_unknown_task_and_missing_data_file(tmp_path):
    with pytest.raises(UsageError, match="unknown task 'boolq'.*lambada_openai"):
        load_task("boolq")
    with pytest.raises(UsageError, match="hellaswag/validation.jsonl not found"):
        load_task("hellaswag", str(tmp_path))
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"context": "a", "choices": ["x"], "label": 0}\n{not json\n')
    with pytest.raises(UsageError, match="line 2"):
        load_task(str(bad))
