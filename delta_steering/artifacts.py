"""The step files as contracts: one dataclass per file that a step writes for the next, written and
read here (`to_json` / `from_json`), the grouping rule written once, and the checks every boundary
runs.

Every file records its provenance (`Provenance`): the model as named, the fingerprint of its
configuration and weights, its family, the layer, and the SHA-256 of each file it was made from. A
step reading another step's file checks the model's fingerprint (not its path: the same weights
elsewhere are a note), the layer and those digests against its own run before the model loads, and
refuses a mismatch with one line naming the file, the field and both values; `--allow_model_mismatch`
and `--transfer_layer` make a deliberate transfer, which the new file records under `transferred`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UsageError
from .intervention import ABLATIONS, Intervention, Steering, check_factor
from .results_io import file_digest, finite, json_digest, read_json

FORMAT_VERSION = 3  # 3: model_digest is the weights' fingerprint (2: the configuration's digest)
HIGH_IMPACT = 2.0  # points, the default cut: High Impact is impact > cut, Neutral |impact| <= cut (measured only)
FALLBACK_SENSITIVE = 20  # the delta-sensitive set when no neuron is High Impact: the top 20 by impact
STEP1_DEFAULTS = ("discovered_neurons.json", "ablation_3_results/discovered_neurons.json")
STEP2_NAME = "cluster9_ablation_results_all_neurons.json"
STEP2_DEFAULTS = (f"cluster9_ablation_results/{STEP2_NAME}",)
STEP3_FILES = {"combined": "combined_steering_ifeval_results.json",
               "cluster_ablation": "cluster_ablation_ifeval_results.json",
               "layer_ablation": "layer_ablation_ifeval_results.json"}
GROUP_TITLES = {"high_impact": "High Impact", "neutral": "Neutral"}
IN_MEMORY = "(in memory)"  # the path recorded for a contract a step function returned, not read from a file
WHAT = {"step1": "step-1 file", "step2": "step-2 file", "step3": "step-3 file",
        "evaluate_steered": "evaluate_steered comparison", "atlas": "atlas file"}


def measured_finite(records: list[dict]) -> list[dict]:
    """The step-1 records of neurons measured exactly with finite logits (an impact), in their order."""
    return [r for r in records if r.get("measured", True) and r["impact"] is not None]


def impact_groups(records: list[dict], cut: float = HIGH_IMPACT) -> dict[str, list[int]]:
    """The grouping rule: High Impact (impact > cut points, 2 by default) and Neutral (|impact| <=
    cut), among the neurons measured exactly with finite logits."""
    measured = measured_finite(records)
    return {"high_impact": sorted(r["neuron"] for r in measured if r["impact"] > cut),
            "neutral": sorted(r["neuron"] for r in measured if abs(r["impact"]) <= cut)}


def delta_sensitive(records: list[dict], groups: dict[str, list[int]]) -> list[int]:
    """Step 3's delta-sensitive set: the High Impact group, or when it is empty the 20 neurons of
    largest impact (records sorted by impact, as step 1 writes them)."""
    if groups["high_impact"]:
        return list(groups["high_impact"])
    return sorted(r["neuron"] for r in measured_finite(records)[:FALLBACK_SENSITIVE])


def locate(explicit: str | Path | None, defaults: tuple[str, ...], what: str, flag: str) -> Path:
    """The file given by `flag`, else the first default that exists; a UsageError lists the paths tried."""
    tried = [str(explicit)] if explicit else list(defaults)
    for candidate in tried:
        if Path(candidate).is_file():
            return Path(candidate)
    if explicit and Path(explicit).is_dir():
        raise UsageError(f"{flag} {explicit} is a directory, not a {what}")
    raise UsageError(f"{what} not found (tried {', '.join(tried)}); pass {flag} PATH")


def same_model(a: str, b: str) -> bool:
    """Model names match, comparing local directories by their real path."""
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/") == b.rstrip("/")


def content_digest(data: dict) -> str:
    """SHA-256 of a step file's canonical JSON without its own `content_sha256` field."""
    body = {k: v for k, v in data.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(finite(body), sort_keys=True, ensure_ascii=False, allow_nan=False).encode()
                          ).hexdigest()


def seal(data: dict) -> dict:
    """`data` with `content_sha256` last, so that a later step tells a file edited by hand (a factor
    typed in, a layer changed) from the one its step wrote."""
    return {**{k: v for k, v in data.items() if k != "content_sha256"}, "content_sha256": content_digest(data)}


class _Reader:
    """Field checks of one file, each failure a UsageError naming the file and the field."""

    def __init__(self, data: Any, path: Path, step: str):
        self.path, self.what = path, WHAT[step]
        if not isinstance(data, dict):
            self.fail("is not a JSON object")
        found = data.get("step") or ("step2" if "optimal_factors" in data else
                                     "step1" if "all_neuron_impacts" in data else None)
        if found != step:
            flag = {"step1": "--neurons_file", "step2": "--factors_file or --from_step2"}.get(found)
            self.fail(f"is {'a ' + WHAT[found] if found in WHAT else 'no step file'}, not a {self.what}"
                      + (f" (it goes to {flag})" if flag else ""))
        if data.get("format_version") != FORMAT_VERSION:
            self.fail(f"has format_version {data.get('format_version')!r}, this version reads {FORMAT_VERSION}: "
                      "rerun the step that writes it")
        if data.get("content_sha256") != content_digest(data):
            self.fail("was changed after its step wrote it (field content_sha256 does not match its contents): "
                      "rerun the step that writes it")
        self.data = data

    def fail(self, message: str):
        raise UsageError(f"{self.what} {self.path} {message}")

    def get(self, name: str, kind: type | tuple, optional: bool = False):
        if name not in self.data:
            if optional:
                return None
            self.fail(f"is malformed: it has no {name!r} field (rerun the step that writes it)")
        value = self.data[name]
        if value is None and optional:
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.fail(f"is malformed: {name!r} is {value!r}")
        return value

    def ids(self, name: str, values: Any) -> list[int]:
        """A list of distinct neuron ids."""
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            self.fail(f"is malformed: {name} must be a list of integer neuron ids, not {values!r}")
        if len(set(values)) != len(values):
            self.fail(f"is malformed: {name} lists neuron {next(v for v in values if values.count(v) > 1)} twice")
        return values

    def numbers(self, name: str, count: int | None = None) -> list[float]:
        values = self.get(name, list)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            self.fail(f"is malformed: {name} must hold finite numbers")
        if count is not None and len(values) != count:
            self.fail(f"is malformed: {name} has {len(values)} entries for {count} neurons")
        return values


@dataclass(frozen=True)
class Provenance:
    """Where a step file came from: the model as named and its fingerprint (configuration and
    weights, `loading.weights_fingerprint`), its family, the layer, the SHA-256 of each input file by
    role, and any deliberate transfer (another model, another layer) the run was told to make."""

    model: str
    model_digest: str
    family: str
    layer: int | None
    inputs: dict[str, dict] = field(default_factory=dict)  # role -> {"path", "sha256"}
    transferred: dict[str, dict] = field(default_factory=dict)  # "model" / "layer" -> {"from", "to"}

    @classmethod
    def of(cls, source, layer: int | None, inputs: dict[str, "StepFile | Path"] | None = None,
           transferred: dict[str, dict] | None = None) -> "Provenance":
        """This run's provenance: `source` a checked models.ModelSource, inputs by role (a step file
        read here, or a path)."""
        records = {role: {"path": str(f.path or IN_MEMORY), "sha256": f.digest} if isinstance(f, StepFile)
                   else {"path": str(f), "sha256": file_digest(f)} for role, f in (inputs or {}).items()}
        return cls(source.name, source.digest, source.family, layer, records, dict(transferred or {}))

    def to_json(self) -> dict:
        record = {"model": self.model, "model_digest": self.model_digest, "family": self.family, "layer": self.layer,
                  "inputs": self.inputs}
        return {**record, "transferred": self.transferred} if self.transferred else record

    @classmethod
    def read(cls, reader: _Reader) -> "Provenance":
        layer = reader.get("layer", int, optional=True)
        inputs = reader.get("inputs", dict)
        if not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("path"), str)
                   for v in inputs.values()):
            reader.fail("is malformed: inputs must map each role to {\"path\", \"sha256\"}")
        return cls(reader.get("model", str), reader.get("model_digest", str), reader.get("family", str), layer,
                   inputs, reader.get("transferred", dict, optional=True) or {})


@dataclass(frozen=True)
class StepFile:
    """What every step file has: its provenance and, once read from disk, its path and SHA-256."""

    provenance: Provenance
    path: Path | None = field(default=None, kw_only=True, compare=False)
    sha256: str | None = field(default=None, kw_only=True, compare=False)

    @property
    def kind(self) -> str:
        """Which step wrote it (a key of WHAT)."""
        return self.STEP

    @property
    def what(self) -> str:
        return f"{WHAT[self.kind]} {self.path or IN_MEMORY}"

    @classmethod
    def own_keys(cls) -> frozenset[str]:
        """The keys `to_json` writes from the contract's own fields; the rest of a file is its `report`."""
        return frozenset(cls(Provenance("", "", "", None, transferred={"": {}})).to_json())

    @property
    def digest(self) -> str:
        """SHA-256 of the file as read, or, for a contract held in memory (a step function's result), of
        the file its step would write for it."""
        return self.sha256 or json_digest(self.to_json())

    @property
    def layer(self) -> int | None:
        return self.provenance.layer

    @property
    def model(self) -> str:
        return self.provenance.model

    def check_model(self, source, allow_mismatch: bool, escape: str = "pass --allow_model_mismatch to use it "
                    "anyway") -> dict:
        """Refuse a file made with another model (another fingerprint of configuration and weights)
        unless `allow_mismatch`, saying `escape` (the way out the run offers); the same weights under
        another name or path are a printed note. Returns the transfer to record ({} when they agree)."""
        theirs, ours = self.provenance, (source.name, source.digest)
        if theirs.model_digest == ours[1]:
            if not same_model(theirs.model, ours[0]):
                print(f"note: {self.what} names the model {theirs.model!r}, this run's is {ours[0]!r}: the same "
                      f"weights (fingerprint {ours[1][:12]}...)")
            return {}
        if allow_mismatch:
            return {"model": {"from": theirs.model, "from_digest": theirs.model_digest, "to": ours[0],
                              "to_digest": ours[1]}}
        other = "another model" if not same_model(theirs.model, ours[0]) else "other weights under the same name"
        raise UsageError(f"{self.what}: field model_digest is {theirs.model_digest[:12]}... (model "
                         f"{theirs.model!r}), this run's model {ours[0]!r} has {ours[1][:12]}... ({other}); {escape}")

    def check_layer(self, layer: int, transfer: bool) -> dict:
        """Refuse a file made at another layer unless `transfer`; returns the transfer to record."""
        if layer == self.layer:
            return {}
        if transfer:
            return {"layer": {"from": self.layer, "to": layer}}
        raise UsageError(f"{self.what}: field layer is {self.layer}, this run's --layer is {layer}; pass "
                         "--transfer_layer to steer its neurons at another layer")

    def check_input(self, role: str, other: "StepFile") -> None:
        """The file this one names as `role` is `other` (same SHA-256)."""
        recorded = self.provenance.inputs.get(role)
        if recorded is None:
            raise UsageError(f"{self.what}: field inputs.{role} is missing; cannot check that it was made from "
                             f"{other.path}")
        if recorded["sha256"] != other.digest:
            raise UsageError(f"{self.what}: field inputs.{role}.sha256 is {recorded['sha256'][:12]}... ("
                             f"{recorded['path']}), but {other.what} has {other.digest[:12]}...: it was made from "
                             "another version of that file")

    def check_named_input(self, role: str) -> str:
        """The file this one names as `role`, at its recorded path: refused if it differs from its
        recorded digest; returns a note when it cannot be checked (not there)."""
        recorded = self.provenance.inputs.get(role)
        if recorded is None or not Path(recorded["path"]).is_file():
            where = "no path" if recorded is None else recorded["path"]
            return f"note: {self.what} names {role} {where}, which is not here; its digest cannot be checked"
        digest = file_digest(recorded["path"])
        if digest != recorded["sha256"]:
            raise UsageError(f"{self.what}: field inputs.{role}.sha256 is {recorded['sha256'][:12]}..., but "
                             f"{recorded['path']} now has {digest[:12]}...: it changed since")
        return f"{role} {recorded['path']}: digest checked"


def _read(cls, path: Path):
    """A validated step file of class `cls` at `path`."""
    reader = _Reader(read_json(path, WHAT[cls.STEP]), Path(path), cls.STEP)
    return replace(cls.read(reader), path=Path(path), sha256=file_digest(path))


@dataclass(frozen=True)
class Discovery(StepFile):
    """Step 1's file: every neuron's impact, the groups, and the delta statistics later steps use.
    `report` holds the rest (baselines, per-task numbers, statistics, run record), written as is."""

    STEP = "step1"
    LEAD = ("beneficial_neurons", "baseline_accuracy", "criterion")  # the original study's fields first

    tasks: list[str] = field(default_factory=list)
    data_dir: str | None = None
    ablation: str = "zero"
    records: list[dict] = field(default_factory=list)  # all_neuron_impacts, by impact
    groups: dict[str, list[int]] = field(default_factory=dict)
    high_impact_cut: float = HIGH_IMPACT  # the cut that made the groups (points)
    delta_variance: list[float] = field(default_factory=list)
    dt_pre_mean: list[float] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    @property
    def variance_ranking(self) -> list[int]:
        """Every neuron, largest delta variance first (ties by id)."""
        return sorted(range(len(self.delta_variance)), key=lambda i: (-self.delta_variance[i], i))

    def ablation_of(self, neurons) -> Intervention:
        """What step 1 did to each neuron: zero ablation, or its mean dt_pre."""
        return Intervention.ablation(self.ablation, neurons, self.dt_pre_mean)

    def to_json(self) -> dict:
        lead = {k: self.report[k] for k in self.LEAD if k in self.report}
        rest = {k: v for k, v in self.report.items() if k not in lead}
        return seal({**lead, "all_neuron_impacts": self.records, "format_version": FORMAT_VERSION, "step": self.STEP,
                     **self.provenance.to_json(), "tasks": self.tasks, "data_dir": self.data_dir,
                     "ablation": self.ablation, "high_impact_cut": self.high_impact_cut, "groups": self.groups,
                     "delta_variance": self.delta_variance,
                     "dt_pre_mean": self.dt_pre_mean, "delta_variance_ranking": self.variance_ranking, **rest})

    @classmethod
    def read(cls, r: _Reader) -> "Discovery":
        provenance = Provenance.read(r)
        if provenance.layer is None:
            r.fail("is malformed: it has no 'layer' field")
        tasks = r.get("tasks", list)
        ablation = r.get("ablation", str)
        if ablation not in ABLATIONS:
            r.fail(f"is malformed: ablation is {ablation!r}, not one of {', '.join(ABLATIONS)}")
        records = r.get("all_neuron_impacts", list)
        if not all(isinstance(x, dict) and "impact" in x
                   and (x["impact"] is None or isinstance(x["impact"], (int, float))) for x in records):
            r.fail("is malformed: all_neuron_impacts needs {\"neuron\", \"impact\"} records")
        measured = set(r.ids("all_neuron_impacts' neurons", [x.get("neuron") for x in records]))
        groups = r.get("groups", dict)
        if set(groups) != set(GROUP_TITLES):
            r.fail(f"is malformed: groups must hold the lists {', '.join(GROUP_TITLES)}")
        for name, neurons in groups.items():
            unknown = set(r.ids(f"groups.{name}", neurons)) - measured
            if unknown:
                r.fail(f"is malformed: groups.{name} has neuron {min(unknown)}, which all_neuron_impacts lacks")
        cut = r.get("high_impact_cut", (int, float))
        if not math.isfinite(cut) or cut < 0:
            r.fail(f"is malformed: high_impact_cut is {cut!r}, not a number of points >= 0")
        variance = r.numbers("delta_variance")
        report = {k: v for k, v in r.data.items() if k not in cls.own_keys()}
        return cls(provenance, tasks=tasks, data_dir=r.get("data_dir", str, optional=True), ablation=ablation,
                   records=records, groups=groups, high_impact_cut=float(cut), delta_variance=variance,
                   dt_pre_mean=r.numbers("dt_pre_mean", len(variance)), report=report)

    def check_against(self, shape) -> None:
        """The file's neuron ids exist in a model of `shape` (sites.Shape)."""
        bad = [r["neuron"] for r in self.records if not 0 <= r["neuron"] < shape.delta_neurons]
        if bad or len(self.delta_variance) != shape.delta_neurons:
            detail = f"neuron {bad[0]}" if bad else f"{len(self.delta_variance)} delta variances"
            raise UsageError(f"{self.what}: {detail} does not fit this model, which has delta neurons "
                             f"0-{shape.delta_neurons - 1}")


def read_discovery(path: str | Path) -> Discovery:
    """A validated step-1 file."""
    return _read(Discovery, Path(path))


def discovery_of(given: "Discovery | str | Path | None", flag: str = "--neurons_file") -> Discovery:
    """The step-1 contract a step takes: as given (a Discovery), or read from its path, by default
    the first of STEP1_DEFAULTS that exists."""
    if isinstance(given, Discovery):
        return given
    return read_discovery(locate(given, STEP1_DEFAULTS, "step-1 file", flag))


def factor_to_steer(optimal: dict | None) -> tuple[float | None, str]:
    """The factor later runs steer a group with, and its source: the confirmed factor
    ("step2-confirmed"), else the selection-best one ("step2-unconfirmed"); None when there is none."""
    if not optimal or optimal.get("selection_best_factor") is None:
        return None, "none"
    if optimal.get("confirmed"):
        return float(optimal["factor"]), "step2-confirmed"
    return float(optimal["selection_best_factor"]), "step2-unconfirmed"


@dataclass(frozen=True)
class Factors(StepFile):
    """Step 2's file: each group's neurons, selection table and optimal factor (with its confirmation).
    `report` holds the rest (baselines, importance ranking, perplexity, run record)."""

    STEP = "step2"

    groups: dict[str, dict] = field(default_factory=dict)  # name -> {"neurons", "results", ...}
    optimal: dict[str, dict | None] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def steering_factor(self, group: str = "high_impact") -> tuple[float | None, str]:
        return factor_to_steer(self.optimal.get(group))

    def steering(self, group: str = "high_impact") -> tuple[Steering, str]:
        """The group's neurons at the file's layer by its factor (see steering_factor), and the factor's source."""
        factor, source = self.steering_factor(group)
        neurons = self.groups.get(group, {}).get("neurons") or []
        if factor is None or not neurons:
            raise UsageError(f"{self.what} has no {GROUP_TITLES.get(group, group)} neurons and factor to steer with")
        return Steering(self.layer, Intervention.scale(neurons, factor)), source

    def to_json(self) -> dict:
        head = {k: v for k, v in self.report.items() if k == "description"}
        rest = {k: v for k, v in self.report.items() if k not in head}
        return seal({"format_version": FORMAT_VERSION, "step": self.STEP, **head, **self.provenance.to_json(), **rest,
                     "groups": self.groups, "optimal_factors": self.optimal})

    @classmethod
    def read(cls, r: _Reader) -> "Factors":
        provenance = Provenance.read(r)
        groups = r.get("groups", dict)
        for name, group in groups.items():
            if not isinstance(group, dict):
                r.fail(f"is malformed: groups.{name} is not an object")
            r.ids(f"groups.{name}.neurons", group.get("neurons"))
        optimal = r.get("optimal_factors", dict)
        for name, record in optimal.items():
            if record is None:
                continue
            if not isinstance(record, dict) or not {"factor", "selection_best_factor", "confirmed"} <= set(record):
                r.fail(f"is malformed: optimal_factors.{name} must hold factor, selection_best_factor and confirmed")
            for key in ("factor", "selection_best_factor"):
                if not isinstance(record[key], (int, float)) or isinstance(record[key], bool):
                    r.fail(f"is malformed: optimal_factors.{name}.{key} is {record[key]!r}")
                check_factor(record[key], f"{WHAT[cls.STEP]} {r.path}: optimal_factors.{name}.{key}")
        return cls(provenance, groups=groups, optimal=optimal,
                   report={k: v for k, v in r.data.items() if k not in cls.own_keys()})


def read_factors(path: str | Path) -> Factors:
    """A validated step-2 file."""
    return _read(Factors, Path(path))


def factors_of(given: "Factors | str | Path | None", flag: str = "--factors_file (or --factor)") -> Factors:
    """The step-2 contract a step takes: as given (a Factors), or read from its path, by default
    STEP2_DEFAULTS's."""
    if isinstance(given, Factors):
        return given
    return read_factors(locate(given, STEP2_DEFAULTS, "step-2 file", flag))


@dataclass(frozen=True)
class Results(StepFile):
    """A file no later step reads (step 3's results by mode, evaluate_steered's comparison): the
    same provenance, then the results as the step reports them."""

    step: str = "step3"
    report: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.step

    def to_json(self) -> dict:
        head = {k: v for k, v in self.report.items() if k == "description"}
        return seal({"format_version": FORMAT_VERSION, "step": self.step, **head, **self.provenance.to_json(),
                     **{k: v for k, v in self.report.items() if k not in head}})


@dataclass(frozen=True)
class Verification:
    """Step 3's outputs: the results of each mode (written to `STEP3_FILES[mode]`) and the responses of
    each configuration (`responses_<configuration>.jsonl`)."""

    results: dict[str, Results]
    responses: dict[str, list[dict]]

    def to_json(self) -> dict[str, dict]:
        """Each mode's results file, by mode."""
        return {mode: result.to_json() for mode, result in self.results.items()}


@dataclass(frozen=True)
class Step2Steering:
    """Step 2's High Impact steering as a run outside the three steps takes it (evaluate_steered.py,
    the export): the checked file, the steering, its factor's source, the transfer to record, and
    lines to show the user (the named step-1 file's check, an unconfirmed factor)."""

    factors: Factors
    steering: Steering
    factor_source: str
    transferred: dict
    notes: tuple[str, ...]


def step2_steering(path: str | Path, source, allow_mismatch: bool | None = False) -> Step2Steering:
    """The High Impact neurons of a step-2 file at its layer by its factor, the file checked against
    the run's model (`source`, a models.ModelSource) and the step-1 file it names. `allow_mismatch`
    None: the run has no --allow_model_mismatch (the export), so a mismatch says how to steer instead."""
    factors = read_factors(path)
    escape = "pass --allow_model_mismatch to use it anyway" if allow_mismatch is not None else \
        "give --model the model it was made with, or steer this one with --steer LAYER:NEURONS:FACTOR"
    transferred = factors.check_model(source, bool(allow_mismatch), escape)
    notes = [factors.check_named_input("step1_file")]
    steering, factor_source = factors.steering("high_impact")
    if factor_source == "step2-unconfirmed":
        notes.append(f"warning: step 2 did not confirm a High Impact factor; using its selection-best factor "
                     f"x{steering.intervention.factors[0]:g}, unconfirmed")
    return Step2Steering(factors, steering, factor_source, transferred, tuple(notes))
