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


# the lock of an output folder

def test_a_lock_that_cannot_be_written_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno

    from delta_steering import results_io

    real = results_io.os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.file = real(fd, mode)

        def __enter__(self):
            return self

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __exit__(self, *exc):
            self.file.close()

    lock = tmp_path / "step1_checkpoint.json.lock"
    monkeypatch.setattr(results_io.os, "fdopen", FullDisk)
    with pytest.raises(UsageError, match="could not write the lock .* .No space left on device.; nothing was left"):
        results_io.RunLock(lock)
    assert not lock.exists()
    monkeypatch.setattr(results_io.os, "fdopen", real)
    results_io.RunLock(lock).release()


@pytest.mark.parametrize("content", ["", "\n", "garbage", b"\xff\xfe"])
def test_a_lock_that_names_no_process_or_cannot_be_read_is_stale(tmp_path, capsys, content):
    from delta_steering.results_io import RunLock

    lock = tmp_path / "step1_checkpoint.json.lock"
    lock.write_bytes(content if isinstance(content, bytes) else content.encode())
    taken = RunLock(lock)
    assert lock.read_text() == taken.owner and "note: taking over the stale lock" in capsys.readouterr().out
    taken.release()


def test_a_lock_that_cannot_be_read_nor_removed_is_one_line(tmp_path):
    from delta_steering.results_io import RunLock

    lock = tmp_path / "step1_checkpoint.json.lock"
    lock.mkdir()
    with pytest.raises(UsageError, match="is stale .it cannot be read.* but cannot be removed .*delete it and rerun"):
        RunLock(lock)


def test_a_live_lock_holder_is_refused_and_told_apart_from_a_step_run(tmp_path, capsys):
    import platform
    import subprocess
    import sys

    from delta_steering.results_io import RunLock, _started

    lock = tmp_path / "step1_checkpoint.json.lock"
    python = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    sleep = subprocess.Popen(["sleep", "30"])
    try:
        lock.write_text(f"{platform.node()} {python.pid} {_started(python.pid)}")
        with pytest.raises(UsageError, match=f"in use by another run .process {python.pid}"):
            RunLock(lock)
        lock.write_text(f"{platform.node()} {python.pid} 12.00")  # its id, another start: reused
        RunLock(lock).release()
        assert f"process {python.pid} started after it was written" in capsys.readouterr().out
        lock.write_text(f"{platform.node()} {sleep.pid}")
        with pytest.raises(UsageError, match=f"locked by process {sleep.pid} .sleep., which is no step run; if no "
                                             f"run uses this folder, delete {lock}"):
            RunLock(lock)
    finally:
        for process in (python, sleep):
            process.kill()
            process.wait()
