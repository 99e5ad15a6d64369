"""Result files: written atomically with the permissions an ordinary open() gives, read back with
one-line errors."""

import json
import os

import pytest

from delta_steering.errors import UsageError
from delta_steering.results_io import Checkpoint, read_json, read_jsonl, write_json, write_jsonl


@pytest.fixture
def umask():
    def set_mask(mask):
        return os.umask(mask)

    saved = os.umask(0o022)
    os.umask(saved)
    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask, mask, mode):
    umask(mask)
    for path in (write_json(tmp_path / "a.json", {"x": 1}), write_jsonl(tmp_path / "b.jsonl", [{"y": 2}])):
        assert os.stat(path).st_mode & 0o777 == mode
    with open(tmp_path / "plain", "w"):
        pass
    assert os.stat(tmp_path / "plain").st_mode & 0o777 == mode


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json(tmp_path / "a.json", {"kept": True})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"kept": True} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_reading_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(UsageError, match="step-1 file not found"):
        read_json(tmp_path / "none.json", "step-1 file")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(UsageError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(UsageError, match="line 3 is not a JSON object"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_checkpoint_refuses_other_arguments_unless_overwritten(tmp_path):
    first = Checkpoint(tmp_path / "c.json", {"layer": 20})
    first.done["item"] = {"x": 1}
    first.save()
    assert Checkpoint(tmp_path / "c.json", {"layer": 20}).done == {"item": {"x": 1}}
    with pytest.raises(UsageError, match=r"different arguments \(layer\)"):
        Checkpoint(tmp_path / "c.json", {"layer": 19})
    assert Checkpoint(tmp_path / "c.json", {"layer": 19}, overwrite=True).done == {}


def test_checkpoint_refuses_a_changed_input_naming_it(tmp_path):
    made = {"layer": 20, "inputs": {"task file f.jsonl": "a" * 64, "the model's weights": "b" * 64}}
    first = Checkpoint(tmp_path / "c.json", made)
    first.done["item"] = {"x": 1}
    first.save()
    edited = {**made, "inputs": {**made["inputs"], "task file f.jsonl": "c" * 64}}
    with pytest.raises(UsageError, match=r"another version of task file f.jsonl \(SHA-256 aaaaaaaaaaaa... then, "
                                         r"cccccccccccc... now\); pass --overwrite"):
        Checkpoint(tmp_path / "c.json", edited)
    with pytest.raises(UsageError, match="another version of the model's weights"):
        Checkpoint(tmp_path / "c.json", {**made, "inputs": {**made["inputs"], "the model's weights": "d" * 64}})
    with pytest.raises(UsageError, match=r"different inputs \(task file f.jsonl\)"):
        Checkpoint(tmp_path / "c.json", {**made, "inputs": {"the model's weights": "b" * 64}})
    assert Checkpoint(tmp_path / "c.json", edited, overwrite=True).done == {}
