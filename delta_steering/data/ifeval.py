"""IFEval: load the prompts and score responses with lm-evaluation-harness's own checkers.

The checkers live in `lm_eval.tasks.ifeval` (the `lm_eval[ifeval]` extra). Importing them downloads
NLTK's `punkt_tab` when it is missing, so `ensure_punkt` runs first and turns a missing, offline
punkt_tab into one clear error instead of a hang or a download log.

    python -m delta_steering.data.ifeval     # is punkt_tab there? (exit 2 and one line saying how to get it)
"""

from __future__ import annotations

import io
import logging
import random
import socket
import warnings
from pathlib import Path
from types import ModuleType

from ..errors import UsageError
from ..results_io import check_file, read_jsonl_rows, warn

HUB_DATASET = "google/IFEval"
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
FIELDS = {"key": int, "prompt": str, "instruction_id_list": list, "kwargs": list}


PUNKT = "tokenizers/punkt_tab/english/"


def punkt_missing() -> str | None:
    """None when NLTK's `punkt_tab` loads, else one line: the folders NLTK searched and how to get it."""
    import nltk

    try:
        nltk.data.find(PUNKT)
        return None
    except LookupError:
        return ("NLTK's punkt_tab (needed by the IFEval checkers) is in none of NLTK's folders "
                f"({', '.join(map(str, nltk.data.path))}): download it with `python -m nltk.downloader -d DIR "
                "punkt_tab` and set NLTK_DATA=DIR, or set NLTK_DATA to a folder that holds tokenizers/punkt_tab")


def ensure_punkt() -> None:
    """Make NLTK's `punkt_tab` loadable: find it, else try one quiet download, else a UsageError."""
    import nltk

    if punkt_missing() is None:
        return
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # nltk's urlopen has none: a firewalled network would hang
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nltk.download("punkt_tab", quiet=True, raise_on_error=False, print_error_to=io.StringIO())
        nltk.data.find(PUNKT)
    except (LookupError, OSError, ValueError):
        raise UsageError(f"{punkt_missing()}; it could not be downloaded now") from None
    finally:
        socket.setdefaulttimeout(timeout)


def _checkers() -> tuple[ModuleType, dict]:
    """lm-eval's IFEval scoring module and its instruction registry, imported after ensure_punkt."""
    ensure_punkt()
    from lm_eval.tasks.ifeval import instructions_registry, utils

    # a response with no detectable language counts as followed; lm-eval also logs the whole response
    logging.getLogger("lm_eval.tasks.ifeval.instructions").setLevel(logging.CRITICAL)
    return utils, instructions_registry.INSTRUCTION_DICT


def _check_row(row: object, where: str, registry: dict) -> dict:
    """One prompt row in IFEval's schema, or a UsageError saying where and what is wrong."""
    if not isinstance(row, dict):
        raise UsageError(f"{where} is not a JSON object")
    for field, kind in FIELDS.items():
        if field not in row:
            raise UsageError(f"{where} has no {field!r} field (IFEval rows have {', '.join(FIELDS)})")
        if not isinstance(row[field], kind):
            raise UsageError(f"{where}: {field!r} is not a {kind.__name__}")
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not ids:
        raise UsageError(f"{where}: instruction_id_list is empty")
    if len(ids) != len(kwargs):
        raise UsageError(f"{where}: {len(ids)} instruction ids but {len(kwargs)} kwargs")
    unknown = [i for i in ids if i not in registry]
    if unknown:
        raise UsageError(f"{where}: unknown instruction id {unknown[0]!r}")
    if not all(isinstance(k, dict) for k in kwargs):
        raise UsageError(f"{where}: kwargs must be JSON objects")
    return {field: row[field] for field in FIELDS}


def _read_file(path: Path, registry: dict) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"IFEval file not found: {path}")
    return [_check_row(row, f"IFEval file {path} line {number}", registry)
            for number, row in read_jsonl_rows(path, "IFEval file")]


def _read_hub(registry: dict) -> list[dict]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(HUB_DATASET, split="train")
    except Exception as e:  # offline, no network, dataset moved
        raise UsageError(f"cannot load {HUB_DATASET} from the Hugging Face Hub ({type(e).__name__}); "
                         "pass --ifeval_path to a local IFEval JSONL (e.g. input_data.jsonl)") from None
    return [_check_row(row, f"{HUB_DATASET} row {i}", registry) for i, row in enumerate(dataset)]


def load_ifeval_prompts(path: str | None = None, num_samples: int | None = None) -> list[dict]:
    """The first `num_samples` IFEval prompts (all if None) from a local JSONL, or from the Hub if no
    path is given. Rows are {key, prompt, instruction_id_list, kwargs}, checked against lm-eval's
    instruction registry so that a bad file fails before any generation."""
    if num_samples is not None and num_samples < 1:
        raise UsageError(f"the number of IFEval samples must be positive, not {num_samples}")
    if path:  # the user's mistake before NLTK's
        check_file(Path(path).expanduser(), "IFEval file")
    _, registry = _checkers()
    rows = _read_file(Path(path).expanduser(), registry) if path else _read_hub(registry)
    if not rows:
        raise UsageError(f"no IFEval prompts in {path or HUB_DATASET}")
    if num_samples is not None and num_samples > len(rows):
        warn(f"{path or HUB_DATASET} has {len(rows)} IFEval prompts; using all {len(rows)}, not {num_samples}")
    return rows[:num_samples]


def match_responses(prompts: list[dict], response_rows: list[dict]) -> list[str]:
    """Responses for `prompts`, paired by prompt text from {"prompt", "response"} rows (the format of
    IFEval's official response files)."""
    by_prompt = {}
    for i, row in enumerate(response_rows):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise UsageError(f"response row {i} lacks a string 'prompt' or 'response' field")
        by_prompt[row["prompt"]] = row["response"]
    missing = [p["prompt"] for p in prompts if p["prompt"] not in by_prompt]
    if missing:
        raise UsageError(f"{len(missing)} of {len(prompts)} IFEval prompts have no response "
                         f"(first: {missing[0][:60]!r})")
    return [by_prompt[p["prompt"]] for p in prompts]


def _seeded_check(check, example, response: str):
    """Run one lm-eval check with `random` and langdetect seeded. The letter checker replaces a
    "letter" that is not one by a random letter (prompts 1122 '#' and 1129 '!'), and langdetect
    samples at random; seeding each check makes a prompt's result repeatable and independent of
    which other prompts are scored, and strict and loose see the same draw."""
    import langdetect

    random.seed(0)
    langdetect.DetectorFactory.seed = 0
    return check(example, response)


def score_responses(prompts: list[dict], responses: list[str]) -> dict:
    """Score responses with lm-eval's strict and loose IFEval checkers.

    Returns the four metrics in percent, the counts, and per prompt which instructions were followed."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("no IFEval prompts to score")
    utils, _ = _checkers()
    state = random.getstate()
    per_prompt = []
    try:
        for prompt, response in zip(prompts, responses):
            example = utils.InputExample(key=prompt["key"], instruction_id_list=prompt["instruction_id_list"],
                                         prompt=prompt["prompt"], kwargs=prompt["kwargs"])
            strict = _seeded_check(utils.test_instruction_following_strict, example, response)
            loose = _seeded_check(utils.test_instruction_following_loose, example, response)
            per_prompt.append({
                "key": prompt["key"], "prompt": prompt["prompt"], "response": response,
                "follow_all_strict": strict.follow_all_instructions,
                "follow_all_loose": loose.follow_all_instructions,
                "instructions": list(prompt["instruction_id_list"]),
                "strict": strict.follow_instruction_list, "loose": loose.follow_instruction_list,
            })
    finally:
        random.setstate(state)  # leave the caller's random stream as it was
    strict = [ok for row in per_prompt for ok in row["strict"]]
    loose = [ok for row in per_prompt for ok in row["loose"]]
    fractions = (sum(r["follow_all_strict"] for r in per_prompt) / len(per_prompt), sum(strict) / len(strict),
                 sum(r["follow_all_loose"] for r in per_prompt) / len(per_prompt), sum(loose) / len(loose))
    return {"metrics": {name: 100 * value for name, value in zip(METRICS, fractions)},
            "num_prompts": len(per_prompt), "num_instructions": len(strict), "per_prompt": per_prompt}


if __name__ == "__main__":
    from ..cli import main_guard

    @main_guard
    def check_punkt() -> None:
        """`make demo`'s first step: fail at once, not after steps 1 and 2, when step 3 could not score."""
        missing = punkt_missing()
        if missing:
            raise UsageError(missing)
        print("NLTK punkt_tab found (IFEval checkers ready)")

    check_punkt()
