"""Task construction through lm-evaluation-harness: the six tasks of the original study request for
request and metric for metric as before, any harness task or tag, generative tasks refused, the
partition, custom task files and their errors."""

import json

import numpy as np
import pytest

from delta_steering.errors import UsageError
from delta_steering.analysis.metrics import correctness
from delta_steering.data.tasks import load_examples, load_task, load_tasks, partition
from handwritten_tasks import BUILTIN_TASKS, handwritten_examples


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_the_six_tasks_equal_the_handwritten_reference_on_every_document(shared_data, builtin_examples, name):
    data_file = shared_data / "tasks_hf" / name / f"{BUILTIN_TASKS[name].split}.jsonl"
    ours = builtin_examples(name)
    reference = handwritten_examples(name, str(data_file))
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert (a.doc_id, a.requests, a.label, a.metric) == (b.doc_id, b.requests, b.label, b.metric), a.doc_id
        assert a.metric == "greedy" or a.choices == b.choices


@pytest.mark.parametrize("name", ["hellaswag", "piqa", "arc_challenge", "winogrande"])
def test_per_document_metric_equals_lm_evals_process_results(builtin_examples, lm_eval_docs, name):
    """Random log-likelihoods scored by this project and by lm-eval's own task agree document by
    document (the first 300)."""
    task, docs = lm_eval_docs(name)
    ours = builtin_examples(name)
    rng = np.random.default_rng(0)
    for example in ours[:300]:
        lls = -rng.uniform(1, 40, len(example.requests))
        expected = task.process_results(docs[example.doc_id], [(float(x), False) for x in lls])[example.metric]
        assert correctness([example], lls, np.zeros(len(lls), dtype=bool))[0] == expected, example.doc_id


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


def test_asking_for_more_examples_than_a_partition_has_says_how_many_are_used(tmp_path, capsys):
    rows = [{"context": f"Key {i} is", "choices": [" red", " blue"], "label": i % 2} for i in range(11)]
    path = write_jsonl(tmp_path / "colors.jsonl", rows)
    assert len(load_examples([str(path)], None, "heldout", 100)) == 6
    assert capsys.readouterr().out.strip() == "warning: task colors has 6 heldout examples; using 6, not 100"
    assert len(load_examples([str(path)], None, "heldout", 6)) == 6 and not capsys.readouterr().out


@pytest.mark.parametrize("rows,match", [
    ([], "empty"),
    ([{"context": "a", "choices": ["x", "y"], "label": 0}, {"context": "b", "choices": [], "label": 0}], "line 2"),
    ([{"context": "a", "choices": ["x", "y"], "label": 0}, {"context": "b", "choices": ["x"], "label": 0}],
     "line 2: one choice only"),
    ([{"context": "a", "choices": ["x", "y"], "label": 2}], "line 1"),
    ([{"choices": ["x"], "label": 0}], "line 1"),
])
def test_custom_task_errors_name_the_line(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UsageError, match=match):
        load_task(path)


def test_any_harness_task_and_tag_with_its_metric(tmp_path):
    """boolq is no task of the original study: lm-eval builds it (its prompt, choices, acc); a tag
    expands to its tasks; name:metric picks the metric."""
    (tmp_path / "boolq").mkdir()
    write_jsonl(tmp_path / "boolq" / "validation.jsonl",
                [{"question": f"is it {i}", "passage": "Some text.", "label": i % 2, "idx": i} for i in range(4)])
    boolq = load_task("boolq", str(tmp_path)).examples
    assert boolq[1].requests == (("Some text.\nQuestion: is it 1?\nAnswer:", " no"),
                                 ("Some text.\nQuestion: is it 1?\nAnswer:", " yes"))
    assert boolq[1].label == 1 and boolq[0].label == 0 and boolq[0].metric == "acc"
    for name, rows in (("piqa", hub_rows("piqa", 4)),):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "validation.jsonl", rows)
    assert load_task("piqa:acc_norm", str(tmp_path)).examples[0].metric == "acc_norm"
    assert load_task("piqa", str(tmp_path)).examples[0].metric == "acc"  # the original study's
    with pytest.raises(UsageError, match="unknown metric 'f1'"):
        load_task("piqa:f1", str(tmp_path))


def test_a_tag_expands_to_its_tasks(shared_data):
    tasks = load_tasks("ai2_arc", str(shared_data / "tasks_hf"))
    assert sorted(t.name for t in tasks) == ["arc_challenge", "arc_easy"]
    metrics = {e.task: e.metric for e in load_examples(["ai2_arc"], str(shared_data / "tasks_hf"), "discovery", 2)}
    assert metrics == {"arc_easy": "acc", "arc_challenge": "acc_norm"}


@pytest.mark.parametrize("name,message", [("gsm8k", "gsm8k has output_type generate_until"),
                                          ("wikitext", "wikitext has output_type loglikelihood_rolling"),
                                          ("no_such_task", "unknown task 'no_such_task'")])
def test_tasks_that_cannot_be_scored_by_log_likelihood_are_refused(name, message):
    with pytest.raises(UsageError, match=message):
        load_tasks(name)


def test_unknown_task_and_missing_data_file(tmp_path):
    with pytest.raises(UsageError, match="unknown task 'boolqq'"):
        load_task("boolqq")
    with pytest.raises(UsageError, match="hellaswag/validation.jsonl not found"):
        load_task("hellaswag", str(tmp_path))
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"context": "a", "choices": ["x"], "label": 0}\n{not json\n')
    with pytest.raises(UsageError, match="line 2"):
        load_task(str(bad))
