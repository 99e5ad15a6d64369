"""Train the bundled demo model `models/mamba-tiny-demo/` and write its demo data, on CPU, offline.

    .venv/bin/python models/train_demo_model.py --scan_neurons   # seed 0: the committed checkpoint
    .venv/bin/python models/train_demo_model.py --steps 20 --out /tmp/demo-check --skip_eval
    .venv/bin/python models/train_demo_model.py --eval_only --scan_neurons --report  # -> models/README.md

This file makes the corpus, the tokenizer, the demo data and the model, and trains it; the
`delta_steering` package evaluates it, as the three steps do (log-likelihood scoring of the
choices, greedy generation, lm-eval's IFEval checkers, the single-neuron sweep, the sign test and
Benjamini-Hochberg). IFEval scoring needs NLTK's punkt_tab (set NLTK_DATA).

Everything comes from this file: a deterministic synthetic corpus (no downloaded data), a byte-level
BPE tokenizer trained on it (1536 tokens, EOS/BOS/pad/unk `<|endoftext|>` = id 0), and a small
24-layer Mamba-1 (`MambaForCausalLM`, hidden 64 -> 128 delta neurons per layer, state size 4)
trained from scratch, so that the default layer 20 of the three steps applies unchanged.
The corpus mixes

* memory tasks whose answer needs information from earlier in the sequence: key-value recall,
  copying (induction), counting, and subject-verb agreement across attractor phrases;
* IFEval-style prompts built from IFEval's own checkable instruction types
  (change_case:english_capital / english_lowercase, punctuation:no_comma, startend:end_checker,
  startend:quotation, keywords:existence, detectable_format:title, detectable_content:postscript)
  with compliant responses (prompt + "\n" + response), each terminated by the EOS token so greedy
  generation stops;
* plain sentences of the same small grammar (language modelling, perplexity).

Layer 20 is made the model's long-memory layer (`init_time_steps`): its delta biases start in the
usual range (time steps 0.001-0.1), those of every other layer at 0.5-2 (a state that forgets within
a token or two). Everything stays trainable. Remembering a format instruction across the rest of a
prompt then goes through layer 20's SSM state, and single delta neurons of layer 20 carry it.
(Without this, in a first run with the default range in every layer, no single layer-20 neuron was
significant: the short-range tasks are solved through the conv windows of many layers.)

The script then writes `<out>/demo_data/` from held-out generations (other random streams,
deduplicated against the training corpus; IFEval prompts only with the 16 topics never used as a
topic in training, and with new end phrases / keyword pairs):

* multiple-choice tasks, 400 examples each, one JSON object per line {"context": str, "choices":
  [str, ...], "label": index of the right choice} (what the steps read as a custom task file);
  every choice is one token appended verbatim to the context:
  - `ifeval_format.jsonl`: the first token of the response to a held-out IFEval-style prompt,
    decided by a format instruction given 10-60 tokens earlier: '"', '<<', 'THE' or 'the', with
    the plain 'The' as a distractor (chance 20%); the task whose answers rely on layer 20;
  - `copying.jsonl` (4 choices), `agreement.jsonl` (" is" / " are"), `counting.jsonl` (" 1"-" 4");
  key-value recall is in the training mix but not learned (chance level), so it is not shipped;
* `ifeval_demo.jsonl`: 100 IFEval-format prompts (key, prompt, instruction_id_list, kwargs: one
  dict per instruction with the argument names of lm-eval's checkers, as google/IFEval), disjoint
  from the prompts of ifeval_format.jsonl;
* `text.txt`: 100 documents separated by blank lines, for perplexity.

Training: AdamW (betas 0.9/0.95, weight decay 0.05 on matrices), peak lr 3e-3, 5% warmup, cosine to
10%, batch 16 x 128 tokens of whole packed documents, loss weighted towards answers and responses.
It uses `fast_selective_scan`, an exact sequential scan with a hand-written backward (checked
against the reference scan at start-up), about 2x faster on one CPU thread than the mambapy
parallel scan. The saved config has `use_mambapy=False` (the default reference scan).

Reproducibility: seed 0 (python `random`, numpy, torch), `torch.use_deterministic_algorithms`,
one CPU thread (`--threads`). The corpus (sha256 prefix ba7a36d2f4f65f38 for --steps 1200), the
tokenizer and demo_data are identical on every run; the weights are identical on the same machine
and software (the committed checkpoint: `--steps 1200 --seed 0`, torch 2.13 CPU, transformers 5.24).

Measured figures of the committed checkpoint: models/README.md, written by `--eval_only --report`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import GenerationConfig, MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from transformers.models.mamba import modeling_mamba  # noqa: E402

from delta_steering.engine import scoring
from delta_steering.engine.generation import generate_greedy
from delta_steering.data.ifeval import load_ifeval_prompts, score_responses
from delta_steering.intervention import Intervention
from delta_steering.analysis.stats import benjamini_hochberg, is_significant
from delta_steering.engine.sweep import sweep_correctness
from delta_steering.data.tasks import Example, load_task

EOS = "<|endoftext|>"
LAYER = 20
DEFAULT_OUT = Path(__file__).resolve().parent / "mamba-tiny-demo"
README = Path(__file__).resolve().parent / "README.md"
REPORT_BEGIN, REPORT_END = "<!-- demo-figures:begin -->", "<!-- demo-figures:end -->"

# ----------------------------------------------------------------------------------------------
# Vocabulary of the synthetic language
# ----------------------------------------------------------------------------------------------

NOUNS = [  # (singular, plural); all regular so the plural is a separate, learnable token
    ("river", "rivers"), ("garden", "gardens"), ("mountain", "mountains"), ("forest", "forests"),
    ("ocean", "oceans"), ("village", "villages"), ("castle", "castles"), ("bridge", "bridges"),
    ("tower", "towers"), ("island", "islands"), ("valley", "valleys"), ("meadow", "meadows"),
    ("desert", "deserts"), ("lake", "lakes"), ("harbor", "harbors"), ("market", "markets"),
    ("school", "schools"), ("kitchen", "kitchens"), ("window", "windows"), ("door", "doors"),
    ("lamp", "lamps"), ("table", "tables"), ("chair", "chairs"), ("book", "books"),
    ("letter", "letters"), ("song", "songs"), ("dream", "dreams"), ("cloud", "clouds"),
    ("star", "stars"), ("planet", "planets"), ("stone", "stones"), ("flower", "flowers"),
    ("tree", "trees"), ("bird", "birds"), ("horse", "horses"), ("rabbit", "rabbits"),
    ("cat", "cats"), ("dog", "dogs"), ("owl", "owls"), ("boat", "boats"),
    ("train", "trains"), ("road", "roads"), ("farm", "farms"), ("house", "houses"),
    ("candle", "candles"), ("clock", "clocks"), ("coin", "coins"), ("key", "keys"),
    ("map", "maps"), ("ship", "ships"), ("apple", "apples"), ("cake", "cakes"),
    ("robot", "robots"), ("painter", "painters"), ("farmer", "farmers"), ("teacher", "teachers"),
    ("king", "kings"), ("queen", "queens"), ("sailor", "sailors"), ("doctor", "doctors"),
    ("kite", "kites"), ("drum", "drums"), ("bell", "bells"), ("hill", "hills"),
]
SING = [s for s, _ in NOUNS]
PLUR = [p for _, p in NOUNS]
# IFEval topics: the last 16 nouns are topics only in the held-out prompts (they occur in training
# text in every other role, so their tokens are known).
TRAIN_TOPICS = SING[:48]
HELDOUT_TOPICS = SING[48:]

ADJS = ["quiet", "bright", "old", "young", "small", "large", "green", "blue", "golden", "silver",
        "calm", "warm", "cold", "dark", "happy", "gentle", "wild", "busy", "ancient", "tiny",
        "quick", "slow", "soft", "strong"]
VERBS = [("shines", "shine"), ("waits", "wait"), ("rests", "rest"), ("moves", "move"),
         ("glows", "glow"), ("sleeps", "sleep"), ("stands", "stand"), ("grows", "grow"),
         ("sings", "sing"), ("turns", "turn"), ("falls", "fall"), ("rises", "rise")]
PREPS = ["near", "behind", "under", "beside", "above", "with", "by", "past", "of", "from"]
DIGITS = [str(d) for d in range(10)]
COUNT_WORDS = ["cat", "dog", "owl", "bird", "fox", "bee", "cow", "ant"]
COPY_WORDS = SING + ADJS

# End phrases for startend:end_checker: template x noun. Training uses templates 0-5 with any
# noun; held-out prompts use templates 6-7 (never seen in training) or unseen template/noun pairs.
END_TEMPLATES = [
    "Is there anything else about the {n}?", "That is all about the {n}.",
    "Let me know if you like the {n}.", "Any other questions about the {n}?",
    "I hope you enjoy the {n}.", "Thank you for asking about the {n}.",
    "Tell me more about the {n}.", "Have a nice day with the {n}.",
]
TRAIN_END_TEMPLATES = END_TEMPLATES[:6]
HELDOUT_END_TEMPLATES = END_TEMPLATES[6:]

REQUESTS = [
    "Write a short note about the {t}.", "Describe the {t} in one sentence.",
    "Tell me about the {t}.", "Write a sentence about a {a} {t}.",
    "Write a short story about the {t}.", "What do you think of the {t}?",
]

# instruction id -> description text (IFEval's own phrasing, as lm-eval builds it, plus variants)
DESCRIPTIONS = {
    "change_case:english_capital": [
        "Your entire response should be in English, and in all capital letters.",
        "Your answer must be in English and in all capital letters.",
    ],
    "change_case:english_lowercase": [
        "Your entire response should be in English, and in all lowercase letters. No capital "
        "letters are allowed.",
        "Please reply in English and in all lowercase letters.",
    ],
    "punctuation:no_comma": [
        "In your entire response, refrain from the use of any commas.",
        "Do not use any commas in your response.",
    ],
    "startend:quotation": [
        "Wrap your entire response with double quotation marks.",
        "Please wrap your whole answer in double quotes.",
    ],
    "detectable_format:title": [
        "Your answer must contain a title, wrapped in double angular brackets, such as "
        "<<poem of joy>>.",
        "Include a title wrapped in double angular brackets, i.e. <<title>>.",
    ],
    "detectable_content:postscript": [
        "At the end of your response, please explicitly add a postscript starting with P.S.",
        "Please add a postscript starting with P.S. at the end.",
    ],
    "startend:end_checker": [
        'Finish your response with this exact phrase "{end}". No other words should follow this '
        "phrase.",
        'End your response with the exact phrase "{end}"',
    ],
    "keywords:existence": [
        "Include the keywords {k1} and {k2} in the response.",
        "Make sure to include the words {k1} and {k2}.",
    ],
}
INSTRUCTIONS = list(DESCRIPTIONS)
CONFLICTS = [{"change_case:english_capital", "change_case:english_lowercase"},
             {"startend:end_checker", "detectable_content:postscript"}]

# multiple-choice tasks written to demo_data (kv_recall is in the training mix but this model does
# not learn it: it stays at chance, so it is not shipped)
MC_TASKS = ["ifeval_format", "copying", "agreement", "counting"]


# ----------------------------------------------------------------------------------------------
# Document generators. A document is a list of (text, weight) segments; the weight multiplies the
# token loss (answers and responses 1, unpredictable context tokens small). With eval_mode, a task
# generator returns a multiple-choice row instead: {"context", "choices", "label", "_sig"}, _sig being
# the task instance that held-out rows must not share with training documents.
# ----------------------------------------------------------------------------------------------

CTX_W = 0.1  # weight of random context tokens (keys, values, lists)


def _sentence(rng: random.Random, noun: str | None = None) -> str:
    """One sentence of the plain grammar (lowercase, no final punctuation handling)."""
    n = noun or rng.choice(SING)
    k = rng.randrange(6)
    if k == 0:
        return f"the {rng.choice(ADJS)} {n} {rng.choice(VERBS)[0]} {rng.choice(PREPS)} the {rng.choice(SING)}."
    if k == 1:
        i = rng.randrange(len(NOUNS))
        return f"the {PLUR[i]} {rng.choice(VERBS)[1]} {rng.choice(PREPS)} the {rng.choice(ADJS)} {rng.choice(SING)}."
    if k == 2:
        return f"the {n} is {rng.choice(ADJS)} and {rng.choice(ADJS)}."
    if k == 3:
        a, b, c = rng.sample(ADJS, 3)
        return f"the {n} is {a}, {b} and {c}."
    if k == 4:
        return f"a {rng.choice(ADJS)} {n} {rng.choice(VERBS)[0]} {rng.choice(PREPS)} the {rng.choice(SING)}."
    return f"i like the {n} because it is {rng.choice(ADJS)}."


def _cap(s: str) -> str:
    """Sentence case: the first letter of each sentence and the pronoun i upper case."""
    out, start = [], True
    for w in s.split(" "):
        if w == "i":
            w = "I"
        if start and w:
            j = next((j for j, ch in enumerate(w) if ch.isalpha()), None)
            if j is not None:
                w = w[:j] + w[j].upper() + w[j + 1:]
                start = False
        if w.endswith((".", "?", "!")) or w.endswith(">>"):
            start = True
        out.append(w)
    return " ".join(out)


def doc_text(rng: random.Random) -> list[tuple[str, float]]:
    """A plain-text document of 2-4 sentences."""
    sents = [_sentence(rng) for _ in range(rng.randint(2, 4))]
    return [(_cap(" ".join(sents)), 1.0)]


def doc_kv(rng: random.Random, eval_mode: bool = False) -> list[tuple[str, float]] | dict:
    """Key-value recall: four key-digit pairs, then keys to answer with their digits."""
    keys = rng.sample(SING, 4)
    vals = rng.sample(DIGITS, 4)
    body = "recall :" + "".join(f" {k} {v}" for k, v in zip(keys, vals)) + " ."
    order = rng.sample(range(4), 4 if not eval_mode else 1)
    if eval_mode:
        q = order[0]
        choices = [f" {v}" for v in vals]
        return {"context": body + f" {keys[q]}", "choices": choices, "label": q, "_sig": body}
    segs = [(body, CTX_W)]
    for q in order[: rng.randint(1, 4)]:
        segs += [(f" {keys[q]}", CTX_W), (f" {vals[q]}", 1.0), (" .", 0.3)]
    return segs


def doc_copy(rng: random.Random, eval_mode: bool = False) -> list[tuple[str, float]] | dict:
    """Copying: a list of 5-7 words, repeated after "|"."""
    n = rng.randint(5, 7)
    words = rng.sample(COPY_WORDS, n)
    head = "copy :" + "".join(f" {w}" for w in words) + " |"
    if eval_mode:
        k = rng.randint(1, n - 1)  # answer is words[k], after the first k copied words
        others = rng.sample([w for i, w in enumerate(words) if i != k], 3)
        choices = [f" {w}" for w in [words[k]] + others]
        perm = rng.sample(range(4), 4)
        choices = [choices[i] for i in perm]
        return {"context": head + "".join(f" {w}" for w in words[:k]), "choices": choices,
                "label": perm.index(0), "_sig": head}
    return [(head, CTX_W), ("".join(f" {w}" for w in words), 1.0), (" .", 0.3)]


def doc_count(rng: random.Random, eval_mode: bool = False) -> list[tuple[str, float]] | dict:
    """Counting: how often (1-4) a target word occurs in a list of 5-8 words."""
    target = rng.choice(COUNT_WORDS)
    count = rng.randint(1, 4)
    length = rng.randint(max(5, count + 1), 8)
    others = [w for w in COUNT_WORDS if w != target]
    items = [target] * count + [rng.choice(others) for _ in range(length - count)]
    rng.shuffle(items)
    context = f"count {target} :" + "".join(f" {w}" for w in items) + " ="
    if eval_mode:
        return {"context": context, "choices": [" 1", " 2", " 3", " 4"], "label": count - 1,
                "_sig": context}
    return [(context, CTX_W), (f" {count}", 1.0)]


def doc_agree(rng: random.Random, eval_mode: bool = False) -> list[tuple[str, float]] | dict:
    """Subject-verb agreement: " is" or " are" after a subject followed by 1-2 attractor phrases."""
    i = rng.randrange(len(NOUNS))
    plural = rng.random() < 0.5
    subj = PLUR[i] if plural else SING[i]
    phrase = f"the {subj}"
    for _ in range(rng.randint(1, 2)):  # attractor phrases of either number
        j = rng.randrange(len(NOUNS))
        attractor = PLUR[j] if rng.random() < 0.5 else SING[j]
        adj = f" {rng.choice(ADJS)}" if rng.random() < 0.5 else ""
        phrase += f" {rng.choice(PREPS)} the{adj} {attractor}"
    if eval_mode:
        return {"context": phrase, "choices": [" is", " are"], "label": int(plural), "_sig": phrase}
    verb = " are" if plural else " is"
    return [(phrase, 0.3), (verb, 1.0), (f" {rng.choice(ADJS)} .", 0.3)]


MC_GENERATORS = {"ifeval_format": lambda rng, eval_mode=True: format_example(rng),
                 "kv_recall": doc_kv, "copying": doc_copy, "counting": doc_count,
                 "agreement": doc_agree}


def _pick_instructions(rng: random.Random) -> list[str]:
    """1-3 non-conflicting instruction ids."""
    n = rng.choices([1, 2, 3], weights=[0.45, 0.4, 0.15])[0]
    chosen: list[str] = []
    for ins in rng.sample(INSTRUCTIONS, len(INSTRUCTIONS)):
        if len(chosen) == n:
            break
        if any(ins in c and any(o in c for o in chosen) for c in CONFLICTS):
            continue
        chosen.append(ins)
    return chosen


def ifeval_example(rng: random.Random, heldout: bool) -> tuple[str, str, list[str], list[dict]]:
    """(prompt, response, instruction ids, kwargs) of one IFEval-style example."""
    topic = rng.choice(HELDOUT_TOPICS if heldout else TRAIN_TOPICS)
    adj = rng.choice(ADJS)
    prompt = rng.choice(REQUESTS).format(t=topic, a=adj)
    ids = _pick_instructions(rng)
    kwargs, descr = [], []
    end = k1 = k2 = None
    for ins in ids:
        text = rng.choice(DESCRIPTIONS[ins])
        if ins == "startend:end_checker":
            templates = HELDOUT_END_TEMPLATES if heldout and rng.random() < 0.5 else TRAIN_END_TEMPLATES
            end = rng.choice(templates).format(n=rng.choice(SING))
            kwargs.append({"end_phrase": end})
            text = text.format(end=end)
        elif ins == "keywords:existence":
            k1, k2 = rng.sample([w for w in SING if w != topic], 2)
            kwargs.append({"keywords": [k1, k2]})
            text = text.format(k1=k1, k2=k2)
        elif ins == "detectable_content:postscript":
            kwargs.append({"postscript_marker": "P.S."})
        else:
            kwargs.append({})
        descr.append(text)
    prompt = prompt + " " + " ".join(descr)

    # the response: [title] body [keywords sentence] [end phrase] [P.S.], then case and quotes
    no_comma = "punctuation:no_comma" in ids
    sents = []
    body = _sentence(rng, noun=topic)
    while no_comma and "," in body:
        body = _sentence(rng, noun=topic)
    sents.append(body)
    if k1:
        sents.append(f"the {k1} is {rng.choice(ADJS)} and the {k2} is {rng.choice(ADJS)}.")
    elif rng.random() < 0.3:
        extra = _sentence(rng)
        while no_comma and "," in extra:
            extra = _sentence(rng)
        sents.append(extra)
    text = _cap(" ".join(sents))
    if "detectable_format:title" in ids:
        text = f"<<{_cap(rng.choice(['the ' + topic, adj + ' ' + topic, 'my ' + topic]))}>>\n" + text
    if end:
        text = text + " " + end
    if "detectable_content:postscript" in ids:
        text = text + "\nP.S. " + _cap(f"the {rng.choice(SING)} is {rng.choice(ADJS)}.")
    if "change_case:english_capital" in ids:
        text = text.upper()
    elif "change_case:english_lowercase" in ids:
        text = text.lower()
    if "startend:quotation" in ids:
        text = f'"{text}"'
    return prompt, text, ids, kwargs


FORMAT_CHOICES = ['"', "<<", "THE", "The", "the"]
FORMAT_DECIDERS = ["startend:quotation", "detectable_format:title", "change_case:english_capital",
                   "change_case:english_lowercase"]


def format_example(rng: random.Random) -> dict:
    """Multiple-choice "ifeval_format": the first token of the response to a held-out IFEval-style
    prompt, which only a format instruction given earlier in the prompt decides: '"' (quotation),
    '<<' (title), 'THE' / 'the' (capital / lowercase letters). Every prompt has such an
    instruction; 'The' (the plain response, what a model that lost the instruction writes) is a
    distractor. The deciding instruction is always followed by at least one other instruction, so
    it lies 10-60 tokens before the answer: the model must hold it in memory (the SSM state of
    layer 20)."""
    while True:
        prompt, response, ids, _ = ifeval_example(rng, heldout=True)
        decider = next((d for d in FORMAT_DECIDERS if d in ids), None)
        if decider is None or ids.index(decider) == len(ids) - 1:
            continue
        body = response.strip('"')
        if body.startswith("<<"):
            body = body.split("\n", 1)[1]
        if body.split(" ")[0].lower() != "the":  # compare case variants of the same word
            continue
        first = '"' if response.startswith('"') else "<<" if response.startswith("<<") else body.split(" ")[0]
        return {"context": prompt + "\n", "choices": list(FORMAT_CHOICES),
                "label": FORMAT_CHOICES.index(first), "_sig": prompt}


def doc_ifeval(rng: random.Random) -> list[tuple[str, float]]:
    """An IFEval-style training prompt and its compliant response."""
    prompt, response, _, _ = ifeval_example(rng, heldout=False)
    return [(prompt, 0.2), ("\n" + response, 1.0)]


TRAIN_MIX = [("kv_recall", doc_kv, 0.22), ("copying", doc_copy, 0.16), ("counting", doc_count, 0.14),
             ("agreement", doc_agree, 0.10), ("ifeval", doc_ifeval, 0.30), ("text", doc_text, 0.08)]


def training_docs(seed: int, n: int) -> list[list[tuple[str, float]]]:
    """The training corpus: `n` documents drawn from TRAIN_MIX."""
    rng = random.Random(f"train-{seed}")
    names = [m[0] for m in TRAIN_MIX]
    gens = {m[0]: m[1] for m in TRAIN_MIX}
    weights = [m[2] for m in TRAIN_MIX]
    return [gens[rng.choices(names, weights)[0]](rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Held-out demo data
# ----------------------------------------------------------------------------------------------


def demo_data(seed: int, train_docs: list, n_mc: int, n_ifeval: int, n_text: int) -> dict:
    """Held-out examples, none of whose contexts / prompts / documents occur in training (and the
    prompts of ifeval_format and of ifeval_demo.jsonl are disjoint)."""
    seen = {"".join(t for t, _ in d) for d in train_docs}
    # the first segment of a training document is its task instance (the key-value list, the list
    # to copy or count, the agreement subject phrase, the IFEval prompt): held-out examples use
    # unseen instances
    seen_instances = {d[0][0] for d in train_docs}
    out = {}
    rng = random.Random(f"heldout-ifeval-{seed}")
    prompts, rows = set(), []
    while len(rows) < n_ifeval:
        prompt, _, ids, kwargs = ifeval_example(rng, heldout=True)
        if prompt in seen_instances or prompt in prompts:
            continue
        prompts.add(prompt)
        rows.append({"key": 1000 + len(rows), "prompt": prompt, "instruction_id_list": ids,
                     "kwargs": kwargs})
    out["ifeval"] = rows
    for task in MC_TASKS:
        rng = random.Random(f"heldout-{task}-{seed}")
        rows, contexts = [], set(prompts) if task == "ifeval_format" else set()
        while len(rows) < n_mc:
            ex = MC_GENERATORS[task](rng, eval_mode=True)
            sig = ex.pop("_sig")
            if sig in seen_instances or sig in contexts:
                continue
            contexts.add(sig)
            rows.append(ex)
        out[task] = rows
    rng = random.Random(f"heldout-text-{seed}")
    texts = []
    while len(texts) < n_text:
        t = doc_text(rng)[0][0]
        if t not in seen:
            texts.append(t)
    out["text"] = texts
    return out


def write_demo_data(directory: Path, data: dict) -> dict:
    """The demo_data files; returns the number of lines or documents of each."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for task in MC_TASKS:
        path = directory / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data[task]))
        sizes[path.name] = len(data[task])
    path = directory / "ifeval_demo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data["ifeval"]))
    sizes[path.name] = len(data["ifeval"])
    path = directory / "text.txt"
    path.write_text("\n\n".join(data["text"]) + "\n")
    sizes[path.name] = len(data["text"])
    return sizes


# ----------------------------------------------------------------------------------------------
# Tokenizer and batches
# ----------------------------------------------------------------------------------------------


def build_tokenizer(docs: list, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `docs` and the grammar's words, EOS = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = ["".join(t for t, _ in d) for d in docs]
    # every word of the grammar in lower, sentence and upper case, often enough to be one token each
    words = " ".join(SING + PLUR + ADJS + PREPS + [v for p in VERBS for v in p])
    texts += [words, _cap(words.replace(" ", ". ")), words.upper()] * 40
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, model_max_length=2048, clean_up_tokenization_spaces=False)


def encode_docs(tokenizer, docs: list, eos_id: int) -> list[tuple[list[int], list[float]]]:
    """Token ids and weights of each document (segments encoded separately, as lm-eval would)."""
    segments = [t for d in docs for t, _ in d]
    enc = tokenizer(segments, add_special_tokens=False)["input_ids"]
    out, k = [], 0
    for d in docs:
        ids, ws = [], []
        for _, w in d:
            ids += enc[k]
            ws += [w] * len(enc[k])
            k += 1
        ids.append(eos_id)
        ws.append(1.0)
        out.append((ids, ws))
    return out


def pack_rows(encoded: list, seq_len: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole documents packed into rows of seq_len tokens (a row starts with a document)."""
    rows_x, rows_w, cur_x, cur_w = [], [], [], []
    for ids, ws in encoded:
        if len(ids) > seq_len:
            continue
        if len(cur_x) + len(ids) > seq_len:
            pad = seq_len - len(cur_x)
            rows_x.append(cur_x + [eos_id] * pad)
            rows_w.append(cur_w + [0.0] * pad)
            cur_x, cur_w = [], []
        cur_x += ids
        cur_w += ws
    return torch.tensor(rows_x), torch.tensor(rows_w)


# ----------------------------------------------------------------------------------------------
# Evaluation, all by the package: the figures that --report writes into models/README.md
# ----------------------------------------------------------------------------------------------

MC_EXAMPLES = 200      # first examples of each multiple-choice file scored for accuracy
IFEVAL_PROMPTS = 100   # prompts of ifeval_demo.jsonl answered and scored
MAX_NEW_TOKENS = 96    # as the saved generation config
SCAN_SETS = [("ifeval_format, first 100", {"ifeval_format": 100}),
             ("ifeval_format, first 50", {"ifeval_format": 50}),
             ("all four tasks, first 50 each", dict.fromkeys(MC_TASKS, 50))]
IFEVAL_METRICS = {"prompt_level_strict_acc": "prompt-level strict",
                  "inst_level_strict_acc": "instruction-level strict",
                  "prompt_level_loose_acc": "prompt-level loose",
                  "inst_level_loose_acc": "instruction-level loose"}


def mc_examples(data_dir: Path, counts: dict[str, int]) -> list[Example]:
    """The first `counts[task]` examples of each multiple-choice file, read as the steps read a task file."""
    return [e for task, n in counts.items() for e in load_task(str(data_dir / f"{task}.jsonl")).examples[:n]]


def accuracy_figures(model, tokenizer, examples: list[Example]) -> dict:
    """Accuracy and chance accuracy in percent, per task and as the mean over tasks."""
    return {"accuracy": scoring.summarize(examples, scoring.score_examples(model, tokenizer, examples)),
            "chance": scoring.summarize(examples, scoring.chance_correctness(examples))}


def ifeval_figures(model, tokenizer, prompts: list[dict]) -> dict:
    """Greedy responses (no chat template, stop at EOS) scored by lm-eval's IFEval checkers."""
    responses = generate_greedy(model, tokenizer, [p["prompt"] for p in prompts], MAX_NEW_TOKENS)
    return score_responses(prompts, responses)


def instruction_counts(per_prompt: list[dict]) -> dict[str, list[int]]:
    """Per instruction id: [followed (strict checker), given]."""
    counts: dict[str, list[int]] = {}
    for row in per_prompt:
        for instruction, followed in zip(row["instructions"], row["strict"]):
            entry = counts.setdefault(instruction, [0, 0])
            entry[0] += int(followed)
            entry[1] += 1
    return dict(sorted(counts.items()))


def neuron_scan(model, tokenizer, examples: list[Example], seed: int = 0) -> list[dict]:
    """Each delta neuron of layer LAYER zero-ablated alone: examples lost and gained, impact in
    points, exact sign-test p and Benjamini-Hochberg q over all the layer's neurons."""
    baseline = scoring.score_examples(model, tokenizer, examples)
    neurons = list(range(model.config.intermediate_size))
    ablated = sweep_correctness(model, tokenizer, examples, LAYER, Intervention.scale(neurons, 0.0))
    comparison = scoring.Comparison(examples, baseline, seed)
    records = [{**comparison.impact(row, neuron=n), "lost": int(((baseline == 1) & (row == 0)).sum()),
                "gained": int(((baseline == 0) & (row == 1)).sum())} for n, row in zip(neurons, ablated)]
    for record, q in zip(records, benjamini_hochberg([r["p_value"] for r in records])):
        record["q_value"] = q
    return records


def significant(records: list[dict]) -> list[dict]:
    """The neurons with q < 0.05, smallest p first."""
    return sorted((r for r in records if is_significant(r["q_value"])), key=lambda r: (r["p_value"], r["neuron"]))


def load_checkpoint(directory: Path) -> tuple[MambaForCausalLM, PreTrainedTokenizerFast]:
    """The model (eval mode, no gradients) and tokenizer saved in `directory`."""
    model = MambaForCausalLM.from_pretrained(directory).eval()
    model.requires_grad_(False)
    return model, PreTrainedTokenizerFast.from_pretrained(directory)


def evaluate_checkpoint(directory: Path, scan: bool, log: Callable[[str], None]) -> dict:
    """The figures of the checkpoint in `directory` on its demo_data, each logged as it comes:
    multiple-choice accuracy, IFEval and, with `scan`, the single-neuron scans of SCAN_SETS."""
    model, tokenizer = load_checkpoint(directory)
    data_dir = directory / "demo_data"
    figures = {"parameters": sum(p.numel() for p in model.parameters()),
               "weights_bytes": (directory / "model.safetensors").stat().st_size}
    figures["mc"] = accuracy_figures(model, tokenizer, mc_examples(data_dir, dict.fromkeys(MC_TASKS, MC_EXAMPLES)))
    log("\n" + mc_section(figures["mc"]))
    prompts = load_ifeval_prompts(str(data_dir / "ifeval_demo.jsonl"), IFEVAL_PROMPTS)
    figures["ifeval"] = ifeval_figures(model, tokenizer, prompts)
    log("\n" + ifeval_section(figures["ifeval"]) + "\nfirst responses:\n" + "\n".join(
        f"  {row['prompt']!r}\n    -> {row['response']!r}" for row in figures["ifeval"]["per_prompt"][:3]))
    if scan:
        figures["scan"] = {name: neuron_scan(model, tokenizer, mc_examples(data_dir, counts))
                           for name, counts in SCAN_SETS}
        log("\n" + scan_section(figures["scan"]))
    return figures


def report_header(figures: dict, command: str, minutes: float) -> str:
    """When, how and on what the figures were measured."""
    threads = torch.get_num_threads()
    return (f"Written on {datetime.date.today().isoformat()} by `{command}` (evaluation {minutes:.1f} min); "
            f"measured on CPU ({platform.machine()}, {os.cpu_count()} cores, {threads} torch "
            f"thread{'s' if threads > 1 else ''}), torch {torch.__version__}, transformers {transformers.__version__}. "
            "The checkpoint: "
            f"{figures['parameters']:,} parameters, model.safetensors {figures['weights_bytes'] / 1e6:.1f} MB.")


def mc_section(mc: dict) -> str:
    """Accuracy against chance per task, as Markdown."""
    rows = [f"| {task} | {accuracy:.1f}% | {mc['chance']['per_task'][task]:.1f}% |"
            for task, accuracy in mc["accuracy"]["per_task"].items()]
    return "\n".join([
        f"**Multiple choice**, the first {MC_EXAMPLES} examples of each task file in `demo_data/`, scored by "
        "`delta_steering.scoring` as the steps score them (summed log-probability of each choice, lm-eval "
        "tokenisation, acc):", "", "| task | accuracy | chance |", "|---|---:|---:|", *rows,
        f"| mean over tasks | {mc['accuracy']['accuracy']:.1f}% | {mc['chance']['accuracy']:.1f}% |"])


def ifeval_section(ifeval: dict) -> str:
    """The four IFEval metrics and each instruction's follow rate, as Markdown."""
    metrics = ", ".join(f"{IFEVAL_METRICS[k]} {v:.1f}%" for k, v in ifeval["metrics"].items())
    rows = [f"| {name} | {followed}/{given} |" for name, (followed, given) in
            instruction_counts(ifeval["per_prompt"]).items()]
    return "\n".join([
        f"**IFEval**, the {ifeval['num_prompts']} prompts of `demo_data/ifeval_demo.jsonl` (greedy, no chat "
        f"template, stop at EOS, at most {MAX_NEW_TOKENS} new tokens; lm-eval's checkers): {metrics}.", "",
        "| instruction | followed (strict) |", "|---|---:|", *rows])


def scan_section(scans: dict[str, list[dict]]) -> str:
    """The significant neurons of each scan, as Markdown."""
    rows = []
    for name, records in scans.items():
        rows += [f"| {name} | {r['neuron']} | {r['lost']} | {r['gained']} | {r['impact']:+.1f} | {r['q_value']:.2g} |"
                 for r in significant(records)] or [f"| {name} | none | | | | |"]
    n_neurons = len(next(iter(scans.values())))
    return "\n".join([
        f"**Layer-{LAYER} single-neuron zero ablation**, each of the {n_neurons} delta neurons alone "
        "(`delta_steering.sweep`). Lost / gained: examples whose correctness flips; impact: accuracy lost, in "
        f"points; q: Benjamini-Hochberg over the {n_neurons} neurons of the exact sign test on the flips. The "
        "neurons with q < 0.05, smallest p first:", "",
        "| examples | neuron | lost | gained | impact | q |", "|---|---:|---:|---:|---:|---:|", *rows])


def report_text(figures: dict, command: str, minutes: float) -> str:
    """The Markdown that --report puts between the figure markers of models/README.md."""
    sections = [report_header(figures, command, minutes), mc_section(figures["mc"]), ifeval_section(figures["ifeval"])]
    if "scan" in figures:
        sections.append(scan_section(figures["scan"]))
    return "\n\n".join(sections) + "\n"


def write_report(readme: Path, text: str) -> None:
    """Replace what lies between the figure marker lines of `readme` with `text`."""
    content = readme.read_text()
    begin, end = content.find(REPORT_BEGIN), content.find(REPORT_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{readme} lacks the marker lines {REPORT_BEGIN} and {REPORT_END}")
    readme.write_text(content[:begin + len(REPORT_BEGIN)] + "\n" + text + content[end:])


# ----------------------------------------------------------------------------------------------
# Training-time selective scan: the same recurrence as transformers' reference scan
# (h_t = exp(A dt_t) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t, gated by silu(z)), run
# sequentially in a (time, batch, state, channel) layout with a hand-written backward. On one CPU
# thread it is about 2x faster than mambapy's parallel scan here (their broadcasts with an
# innermost dimension of state_size=4 are slow). `check_fast_scan` compares it with the reference.
# ----------------------------------------------------------------------------------------------


class _SequentialScan(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t along dim 0 (h_{-1} = 0), with a hand-written backward."""

    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        h = torch.empty_like(b)
        h[0] = b[0]
        for t in range(1, b.shape[0]):
            torch.addcmul(b[t], a[t], h[t - 1], out=h[t])
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        grad_h = grad_h.contiguous()
        g = torch.empty_like(grad_h)
        n = g.shape[0]
        g[n - 1] = grad_h[n - 1]
        for t in range(n - 2, -1, -1):
            torch.addcmul(grad_h[t], a[t + 1], g[t + 1], out=g[t])
        grad_a = torch.empty_like(a)
        grad_a[0] = 0
        torch.mul(g[1:], h[:-1], out=grad_a[1:])
        return grad_a, g


def fast_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, **kwargs):
    """Drop-in for transformers' `mamba_selective_scan` (extra keyword arguments are ignored)."""
    u = hidden_states.float()
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt_t = dt.permute(2, 0, 1).contiguous()          # (L, batch, D)
    u_t = u.permute(2, 0, 1).contiguous()
    dA = torch.exp(dt_t[:, :, None, :] * A.t().contiguous()[None, None])   # (L, batch, N, D)
    bx = (dt_t * u_t)[:, :, None, :] * B.float().permute(2, 0, 1)[..., None]
    h = _SequentialScan.apply(dA, bx)
    y = torch.matmul(C.float().permute(2, 0, 1)[:, :, None, :], h).squeeze(2)   # (L, batch, D)
    y = y.permute(1, 2, 0)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    y = y.to(hidden_states.dtype)
    if return_last_state:
        return y, h[-1].transpose(1, 2)
    return y


@contextmanager
def fast_scan() -> Iterator[None]:
    """Run transformers' Mamba with fast_selective_scan inside the block."""
    original = modeling_mamba.mamba_selective_scan
    modeling_mamba.mamba_selective_scan = fast_selective_scan
    try:
        yield
    finally:
        modeling_mamba.mamba_selective_scan = original


def check_fast_scan(config: MambaConfig) -> float:
    """Max |logit difference| between the fast scan and the reference scan on a random model."""
    torch.manual_seed(1234)
    cfg = config.__class__(**{**config.to_dict(), "use_mambapy": False})
    model = MambaForCausalLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        with fast_scan():
            fast = model(input_ids=x).logits
    return float((ref - fast).abs().max())


# ----------------------------------------------------------------------------------------------
# Model and training
# ----------------------------------------------------------------------------------------------


LONG_MEMORY = (0.001, 0.1)   # initial time steps of layer LAYER (transformers' default range)
SHORT_MEMORY = (0.5, 2.0)    # initial time steps of every other layer


@torch.no_grad()
def init_time_steps(model, seed: int) -> None:
    """Make layer LAYER the long-memory layer: its delta biases start in the usual range (time
    steps 0.001-0.1, state decay per token exp(-dt |A|) close to 1), every other layer's in
    0.5-2 (the state forgets within a token or two). All stay trainable, but in a short run the
    biases hardly move (measured: a run with the default range everywhere ended with its bias
    quantiles unchanged), so information that must travel further than the conv window goes
    through the SSM state of layer LAYER, whose delta neurons then matter one by one."""
    g = torch.Generator().manual_seed(seed + 1)
    for i, block in enumerate(model.backbone.layers):
        lo, hi = LONG_MEMORY if i == LAYER else SHORT_MEMORY
        n = block.mixer.dt_proj.bias.shape[0]
        dt = torch.exp(torch.rand(n, generator=g) * (math.log(hi) - math.log(lo)) + math.log(lo))
        block.mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


def make_model(vocab_size: int, eos_id: int, seed: int) -> MambaForCausalLM:
    """The demo's 24-layer Mamba, initialised from `seed`, with layer LAYER as its long-memory layer."""
    config = MambaConfig(vocab_size=vocab_size, hidden_size=64, state_size=4, num_hidden_layers=24,
                         expand=2, conv_kernel=4, time_step_rank="auto", use_bias=False, use_conv_bias=True,
                         residual_in_fp32=True, tie_word_embeddings=True, pad_token_id=eos_id,
                         bos_token_id=eos_id, eos_token_id=eos_id, use_mambapy=True, use_cache=True)
    set_seeds(seed)
    model = MambaForCausalLM(config)
    init_time_steps(model, seed)
    return model


def write_special_tokens_map(path: Path) -> None:
    """special_tokens_map.json, which transformers 5 no longer writes (older loaders read it)."""
    tokens = {name: EOS for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (Path(path) / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")


def save_checkpoint(model: MambaForCausalLM, tokenizer, path: Path) -> None:
    """Model, tokenizer and generation config; the saved config names the reference scan (use_mambapy=False)."""
    eos_id = tokenizer.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    use = [layer.mixer.use_mambapy for layer in model.backbone.layers]
    model.config.use_mambapy = False
    model.save_pretrained(path, safe_serialization=True)
    model.config.use_mambapy = True
    tokenizer.save_pretrained(path)
    write_special_tokens_map(path)
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False,
                     max_new_tokens=MAX_NEW_TOKENS).save_pretrained(path)
    for layer, u in zip(model.backbone.layers, use):
        layer.mixer.use_mambapy = u


def make_optimizer(model: MambaForCausalLM, lr: float) -> torch.optim.AdamW:
    """AdamW, betas 0.9/0.95, weight decay 0.05 on matrices only (not on A_log nor the embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "A_log" in name or "embeddings" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, steps: int, peak: float) -> float:
    """Learning rate: linear warmup over 5% of the steps, then cosine from `peak` down to 10% of it."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model: MambaForCausalLM, tokenizer, x_all: torch.Tensor, w_all: torch.Tensor,
          args: argparse.Namespace, log: Callable[[str], None]) -> None:
    """args.steps optimizer steps on random batches of the packed rows, loss weighted per token."""
    opt = make_optimizer(model, args.lr)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x_all), generator=g)[:args.steps * args.batch_size]
    model.train()
    t_train = time.time()
    run_loss = run_acc = 0.0
    for step in range(args.steps):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        x, w = x_all[idx], w_all[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        logits = model(input_ids=x).logits[:, :-1].float()
        target, weight = x[:, 1:], w[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                              reduction="none").view_as(weight)
        loss = (nll * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            run_acc += float((logits.argmax(-1) == target).float()[weight >= 1.0].mean())
        run_loss += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = (step % args.log_every) + 1
            log(f"step {step + 1:5d}/{args.steps}  loss {run_loss / k:.4f}  answer-token acc "
                f"{100 * run_acc / k:5.1f}%  lr {lr_at(step, args.steps, args.lr):.2e}  "
                f"{(time.time() - t_train) / (step + 1):.2f}s/step")
            run_loss = run_acc = 0.0
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(model, tokenizer, Path(args.out))
            log(f"checkpoint saved at step {step + 1}")
    log(f"training: {args.steps} steps in {(time.time() - t_train) / 60:.1f} min")


def train_and_save(args: argparse.Namespace, docs: list, data: dict, log: Callable[[str], None]) -> None:
    """Tokenizer, packed rows, model, training; then the checkpoint and demo_data in args.out."""
    out = Path(args.out)
    tokenizer = build_tokenizer(docs[:20000], args.vocab_size)
    eos_id = tokenizer.eos_token_id
    assert eos_id == 0
    log(f"tokenizer: {len(tokenizer)} tokens")
    encoded = encode_docs(tokenizer, docs, eos_id)
    lengths = np.array([len(i) for i, _ in encoded])
    log(f"document tokens: mean {lengths.mean():.1f}, max {lengths.max()}, "
        f"{int((lengths > args.seq_len).sum())} longer than {args.seq_len} dropped")
    x_all, w_all = pack_rows(encoded, args.seq_len, eos_id)
    need = args.steps * args.batch_size
    assert len(x_all) >= need, (len(x_all), need)
    log(f"packed rows: {len(x_all)} (using {need}), weighted tokens per row {w_all.gt(0).sum(1).float().mean():.1f}")
    model = make_model(len(tokenizer), eos_id, args.seed)
    log(f"model: 24 layers, hidden 64, {model.config.intermediate_size} delta neurons per layer, state 4, "
        f"{sum(p.numel() for p in model.parameters())} parameters")
    if args.scan == "fast":
        log(f"fast scan vs reference scan: max |logit difference| {check_fast_scan(model.config):.2e}")
    elif args.scan == "reference":
        for layer in model.backbone.layers:
            layer.mixer.use_mambapy = False
    with fast_scan() if args.scan == "fast" else nullcontext():
        train(model, tokenizer, x_all, w_all, args, log)
    model.eval()
    save_checkpoint(model, tokenizer, out)
    sizes = write_demo_data(out / "demo_data", data)
    total = sum(f.stat().st_size for f in out.glob("*") if f.is_file())
    log(f"saved {out} ({total / 1e6:.2f} MB without demo_data); demo_data: {sizes}")


def set_seeds(seed: int) -> None:
    """Seed python's `random`, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_args() -> argparse.Namespace:
    """The command line; --report only with --eval_only on the committed checkpoint."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps (default 1200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="output checkpoint directory (default models/mamba-tiny-demo)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab_size", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--log_every", type=int, default=25)
    ap.add_argument("--save_every", type=int, default=0, help="also save the checkpoint every N steps")
    ap.add_argument("--scan", choices=["fast", "mambapy", "reference"], default="fast",
                    help="selective scan used for training (default fast: exact, see fast_selective_scan)")
    ap.add_argument("--skip_eval", action="store_true", help="do not evaluate the checkpoint")
    ap.add_argument("--scan_neurons", action="store_true",
                    help=f"also zero-ablate each layer-{LAYER} delta neuron alone")
    ap.add_argument("--eval_only", action="store_true",
                    help="no training: rewrite <out>/demo_data and evaluate the checkpoint in --out")
    ap.add_argument("--report", action="store_true",
                    help="with --eval_only: write the figures (neuron scan included) into models/README.md")
    args = ap.parse_args()
    if args.report and not (args.eval_only and not args.skip_eval):
        ap.error("--report needs --eval_only (and no --skip_eval): it evaluates the committed checkpoint")
    if args.report and Path(args.out).resolve() != DEFAULT_OUT:
        ap.error(f"--report describes the committed checkpoint: leave --out at {DEFAULT_OUT}")
    args.scan_neurons = args.scan_neurons or args.report
    return args


def main() -> int:
    """Corpus and demo data; training (unless --eval_only); evaluation (unless --skip_eval); report."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    out = Path(args.out)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    set_seeds(args.seed)
    n_docs = args.steps * args.batch_size * args.seq_len // 20 + 20000
    docs = training_docs(args.seed, n_docs)
    digest = hashlib.sha256("\x00".join("".join(t for t, _ in d) for d in docs).encode()).hexdigest()
    log(f"corpus: {len(docs)} documents, sha256 {digest[:16]}")
    data = demo_data(args.seed, docs, n_mc=400, n_ifeval=100, n_text=100)
    if args.eval_only:
        log(f"demo_data: {write_demo_data(out / 'demo_data', data)}")
    else:
        train_and_save(args, docs, data, log)
    if not args.skip_eval:
        t_eval = time.time()
        figures = evaluate_checkpoint(out, args.scan_neurons, log)
        if args.report:
            command = " ".join(["python", "models/train_demo_model.py", *sys.argv[1:]])
            write_report(README, report_text(figures, command, (time.time() - t_eval) / 60))
            log(f"figures written to {README}")
    log(f"total wall time {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
