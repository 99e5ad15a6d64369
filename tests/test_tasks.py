"""Task construction: the (context, continuation) pairs of lm-evaluation-harness, the partition,
custom task files and their errors."""

import json

import pytest

from delta_steering.cli import UsageError
from delta_steering.tasks import BUILTIN_TASKS, load_examples, load_task, partition
from lm_eval_reference import lm_eval_requests


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


def test_custom_task_file_is_partitioned_like_a_builtin_pool(tmp_path):
    rows = [{"context": f"Key {i} is", "choices": [" red", " blue"], "label": i % 2} for i in range(11)]
    path = write_jsonl(tmp_path / "colors.jsonl", rows)
    task = load_task(path)
    assert task.name == "colors"
    discovery, heldout = [e.doc_id for e in partition(task, "discovery")], [e.doc_id for e in partition(task, "heldout")]
    assert not set(discovery) & set(heldout) and sorted(discovery + heldout) == list(range(11))
    assert len(discovery) == 5 and discovery != sorted(discovery)  # a fixed-seed shuffle, halves disjoint
    assert [e.doc_id for e in partition(load_task(path), "heldout")] == heldout
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
