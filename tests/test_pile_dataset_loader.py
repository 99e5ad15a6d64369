"""Pile documents from each local format, deterministic for a seed; Hub failures name --pile_path."""

import json
import subprocess
import sys

import pytest
import zstandard

import pile_dataset_loader
from conftest import ROOT
from delta_steering.cli import UsageError
from pile_dataset_loader import load_pile_texts

DOCS = [f"document {i}: the quick brown fox number {i}." for i in range(12)]


def write_all_formats(folder):
    folder.mkdir(exist_ok=True)
    jsonl = "".join(json.dumps({"text": d, "meta": {}}) + "\n" for d in DOCS[:4])
    (folder / "a.jsonl").write_text(jsonl)
    (folder / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in DOCS[4:7]).encode()))
    (folder / "c.txt").write_text("\n\n".join(DOCS[7:10]) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[10:]}), folder / "d.parquet")
    return folder


@pytest.mark.parametrize("name,expected", [("a.jsonl", DOCS[:4]), ("b.jsonl.zst", DOCS[4:7]), ("c.txt", DOCS[7:10]),
                                           ("d.parquet", DOCS[10:])])
def test_each_local_format(tmp_path, name, expected):
    folder = write_all_formats(tmp_path / "pile")
    assert sorted(load_pile_texts(100, path=folder / name)) == sorted(expected)


def test_folder_and_determinism(tmp_path):
    folder = write_all_formats(tmp_path / "pile")
    everything = load_pile_texts(100, seed=0, path=folder)
    assert sorted(everything) == sorted(DOCS)
    first = load_pile_texts(5, seed=3, path=folder)
    assert first == load_pile_texts(5, seed=3, path=folder) and len(first) == 5
    assert first != load_pile_texts(5, seed=4, path=folder)


def test_real_pile_sample(shared_data):
    texts = load_pile_texts(100, path=shared_data / "pile" / "pile_text.jsonl")
    assert len(texts) == 10 and all(len(t) > 100 for t in texts)


def test_bad_local_input(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_pile_texts(5, path=tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UsageError, match="line 2"):
        load_pile_texts(5, path=tmp_path / "bad.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match="unsupported"):
        load_pile_texts(5, path=tmp_path / "x.csv")
    with pytest.raises(UsageError, match="at least 1"):
        load_pile_texts(0, path=tmp_path / "bad.jsonl")


def test_hub_failures_are_logged_and_point_to_pile_path(monkeypatch, capsys):
    import datasets

    def offline(name, *args, **kwargs):
        raise ConnectionError(f"no network for {name}")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="--pile_path"):
        load_pile_texts(3)
    logged = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[1] for line in logged] == [name for name, _ in pile_dataset_loader.HUB_SOURCES]


def test_cli(tmp_path):
    write_all_formats(tmp_path / "pile")
    out = subprocess.run([sys.executable, "pile_dataset_loader.py", "--num_samples", "3", "--pile_path",
                          tmp_path / "pile"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("3 documents")
    bad = subprocess.run([sys.executable, "pile_dataset_loader.py", "--pile_path", tmp_path / "none"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_statistics_and_evaluation_documents_are_disjoint(tmp_path, capsys):
    from pile_dataset_loader import document_digests

    folder = write_all_formats(tmp_path / "pile")
    statistics = load_pile_texts(100, seed=2, path=folder, role="statistics")
    evaluation = load_pile_texts(100, seed=2, path=folder, role="evaluation")
    assert len(statistics) == len(evaluation) == 6
    assert capsys.readouterr().out.count("documents; using 6, not 100") == 2  # fewer than asked: said
    assert not set(statistics) & set(evaluation) and sorted(statistics + evaluation) == sorted(DOCS)
    assert load_pile_texts(3, seed=2, path=folder, role="evaluation") == evaluation[:3]
    assert not set(document_digests(statistics)) & set(document_digests(evaluation))
