"""IFEval: loading prompts, pairing responses, and scoring with lm-eval's checkers."""

import os
import json
import random

import pytest

from delta_steering.data import ifeval
from delta_steering.cli import UsageError
from delta_steering.results_io import read_jsonl


pytestmark = pytest.mark.usefixtures("punkt")


def row(key, ids, kwargs=None, prompt=None):
    return {"key": key, "prompt": prompt or f"prompt {key}", "instruction_id_list": ids,
            "kwargs": kwargs or [{} for _ in ids]}


def score(prompts, responses):
    return ifeval.score_responses(prompts, responses)


def test_hand_made_responses():
    prompts = [row(1, ["punctuation:no_comma"]), row(2, ["punctuation:no_comma"]),
               row(3, ["change_case:english_capital"]), row(4, ["change_case:english_capital"]),
               row(5, ["length_constraints:number_words"], [{"relation": "less than", "num_words": 5}])]
    responses = ["Hello, world.", "Hello world.",
                 "THIS ANSWER IS WRITTEN ENTIRELY IN CAPITAL LETTERS AND IN PLAIN ENGLISH.",
                 "This answer is written in ordinary English sentence case.", "Just four words here."]
    result = score(prompts, responses)
    assert [r["strict"] for r in result["per_prompt"]] == [[False], [True], [True], [False], [True]]
    assert result["metrics"]["prompt_level_strict_acc"] == pytest.approx(60.0)
    assert (result["num_prompts"], result["num_instructions"]) == (5, 5)


def test_prompt_and_instruction_level_strict_and_loose():
    """A leading 'Sure,' line breaks no_comma strictly; loose scoring drops the first line."""
    prompts = [row(1, ["punctuation:no_comma", "change_case:english_lowercase"]),
               row(2, ["punctuation:no_comma"])]
    responses = ["Sure, here it is:\nthis reply has no commas and only lowercase english words in it",
                 "Here is a reply, with a comma."]
    result = score(prompts, responses)
    first, second = result["per_prompt"]
    assert first["instructions"] == ["punctuation:no_comma", "change_case:english_lowercase"]
    assert (first["strict"], first["loose"]) == ([False, False], [True, True])
    assert (first["follow_all_strict"], first["follow_all_loose"]) == (False, True)
    assert (second["strict"], second["loose"]) == ([False], [False])
    assert result["metrics"] == pytest.approx({
        "prompt_level_strict_acc": 0.0, "inst_level_strict_acc": 0.0,
        "prompt_level_loose_acc": 50.0, "inst_level_loose_acc": 200 / 3})
    assert first["key"] == 1 and first["response"] == responses[0]
    json.dumps(result)  # results go straight into the step's JSON


def test_random_checker_arguments_are_seeded():
    """The letter checker replaces the unusable letter '#' by a random one: results must repeat, agree
    between strict and loose, not depend on the other prompts, and leave `random` untouched."""
    prompt = row(1122, ["keywords:letter_frequency"],
                 [{"let_relation": "at least", "letter": "#", "let_frequency": 4}])
    response = "a single line reply #with #four #hash #tags"
    state = random.getstate()
    alone = score([prompt], [response])["per_prompt"][0]
    assert random.getstate() == state
    among = score([row(1, ["punctuation:no_comma"]), prompt], ["x", response])["per_prompt"][1]
    assert alone == among and alone["strict"] == alone["loose"]


COIN_FLIPS = (1122, 1129)  # "letter" '#' and '!': lm-eval checks a randomly drawn letter instead


def test_gpt4_responses_against_the_paper(shared_data):
    """The paper's GPT-4 strict figures are 76.89 / 83.57 (416/541, 697/834). Two prompts are coin
    flips in lm-eval's checker (and in Google's Nov 2023 code): their "letter" is not a letter, so a
    random one is checked. Off those two, the counts are the paper's exactly; with the fixed seed
    both pass here (77.08 / 83.69); the paper's run passed one of them."""
    prompts = ifeval.load_ifeval_prompts(str(shared_data / "ifeval" / "input_data.jsonl"))
    rows = read_jsonl(shared_data / "ifeval" / "input_response_data_gpt4_20231107_145030.jsonl")
    result = score(prompts, ifeval.match_responses(prompts, rows))
    assert (result["num_prompts"], result["num_instructions"]) == (541, 834)
    flips = [r for r in result["per_prompt"] if r["key"] in COIN_FLIPS]
    others = [r for r in result["per_prompt"] if r["key"] not in COIN_FLIPS]
    assert sum(r["follow_all_strict"] for r in others) == 416 - 1
    assert sum(sum(r["strict"]) for r in others) == 697 - 1 - len(flips)  # each flip has one other passing instruction
    assert {k: round(v, 2) for k, v in result["metrics"].items()} == {
        "prompt_level_strict_acc": 77.08, "inst_level_strict_acc": 83.69,  # 417/541, 698/834
        "prompt_level_loose_acc": 79.67, "inst_level_loose_acc": 85.61}  # 431/541, 714/834


def write(tmp_path, lines):
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD = json.dumps(row(1, ["punctuation:no_comma"]))


def test_loader_reads_a_local_file_and_takes_the_first_n(tmp_path):
    lines = [json.dumps(row(k, ["punctuation:no_comma"])) for k in (5, 3, 9)]
    assert [p["key"] for p in ifeval.load_ifeval_prompts(write(tmp_path, lines))] == [5, 3, 9]
    assert [p["key"] for p in ifeval.load_ifeval_prompts(write(tmp_path, lines), num_samples=2)] == [5, 3]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2 is not valid JSON"),
    (json.dumps({"key": 2, "prompt": "p", "kwargs": [{}]}), "line 2 has no 'instruction_id_list'"),
    (json.dumps(row(2, ["punctuation:no_comma"], [{}, {}])), "line 2: 1 instruction ids but 2 kwargs"),
    (json.dumps(row(2, ["punctuation:no_semicolon"])), "line 2: unknown instruction id"),
])
def test_loader_names_the_bad_line(tmp_path, bad, message):
    path = write(tmp_path, [GOOD, bad])
    with pytest.raises(UsageError, match=message) as error:
        ifeval.load_ifeval_prompts(path)
    assert path in str(error.value)


def test_loader_rejects_empty_and_missing_files(tmp_path):
    with pytest.raises(UsageError, match="no IFEval prompts"):
        ifeval.load_ifeval_prompts(write(tmp_path, []))
    with pytest.raises(UsageError, match="not found"):
        ifeval.load_ifeval_prompts(str(tmp_path / "absent.jsonl"))


def test_hub_unreachable_says_to_pass_ifeval_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="--ifeval_path"):
        ifeval.load_ifeval_prompts(None)


def test_match_responses():
    prompts = [row(1, ["punctuation:no_comma"]), row(2, ["punctuation:no_comma"])]
    rows = [{"prompt": "prompt 2", "response": "b"}, {"prompt": "prompt 1", "response": "a"},
            {"prompt": "unused", "response": "c"}]
    assert ifeval.match_responses(prompts, rows) == ["a", "b"]
    with pytest.raises(UsageError, match="1 of 2 IFEval prompts have no response"):
        ifeval.match_responses(prompts, rows[:1])


def test_missing_punkt_is_a_usage_error(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: False)
    with pytest.raises(UsageError, match="set NLTK_DATA to a folder that holds tokenizers/punkt_tab"):
        ifeval.ensure_punkt()


def test_the_demo_checks_punkt_before_step_1_and_says_where_it_looked(tmp_path):
    """`make demo` with NLTK_DATA at an empty folder (and a HOME without nltk_data) stops before step 1
    with one line naming the folders searched and the download command."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    empty, home, out = tmp_path / "nltk_data", tmp_path / "home", tmp_path / "demo"
    empty.mkdir()
    home.mkdir()
    env = {**os.environ, "NLTK_DATA": str(empty), "HOME": str(home)}
    probe = subprocess.run([sys.executable, "-c", "import nltk; nltk.data.find('tokenizers/punkt_tab/english/')"],
                           env=env, capture_output=True)
    if probe.returncode == 0:
        pytest.skip("punkt_tab is installed system-wide, outside NLTK_DATA and HOME")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-o", ".venv/.installed", "demo", f"PY={sys.executable}", f"NLTK_DATA={empty}",
                           f"DEMO_OUT={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "punkt_tab" in errors[0] and str(empty) in errors[0]
    assert "python -m nltk.downloader -d DIR punkt_tab" in errors[0] and "NLTK_DATA" in errors[0]
    assert "step1_neuron_discovery.py" not in done.stdout and not out.exists()  # step 1 never started
