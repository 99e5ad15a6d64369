"""The step files as contracts: what step 1 and step 2 write for the later steps, how a later step
finds and validates them, and the grouping rule, written once.

Step 1's file (`--save_path`, `format_version` 1) carries the layer, the tasks, the ablation kind,
every neuron's impact and the groups; step 2's file carries the groups' factors with their
selection and confirmation. Steps 2 and 3 read these fields; they never re-derive them. A file that
lacks a field, or comes from another format version, is refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .results_io import file_digest, read_json

FORMAT_VERSION = 1
HIGH_IMPACT = 2.0  # points, the default cut: High Impact is impact > cut, Neutral |impact| <= cut (measured only)
FALLBACK_SENSITIVE = 20  # the delta-sensitive set when no neuron is High Impact: the top 20 by impact
STEP1_DEFAULTS = ("discovered_neurons.json", "ablation_3_results/discovered_neurons.json")
STEP2_NAME = "cluster9_ablation_results_all_neurons.json"
STEP2_DEFAULTS = (f"cluster9_ablation_results/{STEP2_NAME}",)
GROUP_TITLES = {"high_impact": "High Impact", "neutral": "Neutral"}


def impact_groups(records: list[dict], cut: float = HIGH_IMPACT) -> dict[str, list[int]]:
    """The grouping rule: High Impact (impact > cut points, 2 by default) and Neutral (|impact| <=
    cut), among the neurons measured exactly with finite logits."""
    measured = [r for r in records if r.get("measured", True) and r["impact"] is not None]
    return {"high_impact": sorted(r["neuron"] for r in measured if r["impact"] > cut),
            "neutral": sorted(r["neuron"] for r in measured if abs(r["impact"]) <= cut)}


def delta_sensitive(records: list[dict], groups: dict[str, list[int]]) -> list[int]:
    """Step 3's delta-sensitive set: the High Impact group, or when it is empty the 20 neurons of
    largest impact (records sorted by impact, as step 1 writes them)."""
    if groups["high_impact"]:
        return list(groups["high_impact"])
    ranked = [r for r in records if r.get("measured", True) and r["impact"] is not None]
    return sorted(r["neuron"] for r in ranked[:FALLBACK_SENSITIVE])


def locate(explicit: str | None, defaults: tuple[str, ...], what: str, flag: str) -> Path:
    """The file given by `flag`, else the first default that exists; a UsageError lists the paths tried."""
    tried = [explicit] if explicit else list(defaults)
    for candidate in tried:
        if Path(candidate).is_file():
            return Path(candidate)
    raise UsageError(f"{what} not found (tried {', '.join(tried)}); pass {flag} PATH")


def _require(data: dict, path: Path, what: str, fields: dict[str, type | tuple]) -> None:
    for field, kind in fields.items():
        if field not in data:
            raise UsageError(f"{what} {path} is malformed: it has no {field!r} field (rerun the step that writes it)")
        if not isinstance(data[field], kind) or isinstance(data[field], bool) and kind is int:
            raise UsageError(f"{what} {path}: {field!r} is malformed")


def _check_version(data, path: Path, what: str) -> dict:
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} is malformed: not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{what} {path} has format_version {data.get('format_version')!r}, this version reads "
                         f"{FORMAT_VERSION}: rerun the step that writes it")
    return data


def same_model(a: str | None, b: str) -> bool:
    """Model names match, comparing local directories by their real path."""
    if a is None:
        return True
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/") == b.rstrip("/")


@dataclass(frozen=True)
class Discovery:
    """What step 2 and 3 take from step 1's file."""

    path: Path
    sha256: str
    model: str
    layer: int
    tasks: list[str]
    data_dir: str | None
    ablation: str
    records: list[dict]  # all_neuron_impacts, by impact
    groups: dict[str, list[int]]
    variance_ranking: list[int]  # every neuron, largest delta variance first
    dt_pre_mean: list[float]
    high_impact_cut: float = HIGH_IMPACT  # the cut that made the groups (points)

    def check_model(self, model_name: str, allow_mismatch: bool) -> None:
        if not allow_mismatch and not same_model(self.model, model_name):
            raise UsageError(f"step-1 file {self.path} was made with model {self.model!r}, not {model_name!r}; "
                             "pass --allow_model_mismatch to use it anyway")

    def check_against(self, shape) -> None:
        """The file's layer and neuron ids exist in a model of `shape` (sites.Shape)."""
        num_layers, num_neurons = shape.num_layers, shape.delta_neurons
        if not 0 <= self.layer < num_layers:
            raise UsageError(f"step-1 file {self.path}: layer {self.layer} out of range for this model "
                             f"(0-{num_layers - 1})")
        bad = [r["neuron"] for r in self.records if not 0 <= r["neuron"] < num_neurons]
        if bad:
            raise UsageError(f"step-1 file {self.path}: neuron {bad[0]} out of range, the model has delta neurons "
                             f"0-{num_neurons - 1}")


def read_discovery(path: Path) -> Discovery:
    """A validated step-1 file (everything that can be checked without the model)."""
    what = "step-1 file"
    data = _check_version(read_json(path, what), path, what)
    _require(data, path, what, {"model": str, "layer": int, "tasks": list, "ablation": str,
                                "all_neuron_impacts": list, "groups": dict, "delta_variance_ranking": list,
                                "dt_pre_mean": list})
    records = data["all_neuron_impacts"]
    if not all(isinstance(r, dict) and isinstance(r.get("neuron"), int) and "impact" in r for r in records):
        raise UsageError(f"{what} {path} is malformed: all_neuron_impacts needs {{\"neuron\", \"impact\"}} records")
    groups = data["groups"]
    if set(groups) != set(GROUP_TITLES) or not all(isinstance(v, list) for v in groups.values()):
        raise UsageError(f"{what} {path}: 'groups' must hold the lists {', '.join(GROUP_TITLES)}")
    return Discovery(Path(path), file_digest(path), data["model"], data["layer"], data["tasks"], data.get("data_dir"),
                     data["ablation"], records, groups, data["delta_variance_ranking"], data["dt_pre_mean"],
                     float(data.get("high_impact_cut", HIGH_IMPACT)))


def steering_factor(optimal: dict | None) -> tuple[float | None, str]:
    """The factor later runs steer a group with, and its source: the confirmed factor
    ("step2-confirmed"), else the selection-best one ("step2-unconfirmed"); None when there is none."""
    if not optimal or optimal.get("selection_best_factor") is None:
        return None, "none"
    if optimal.get("confirmed"):
        return float(optimal["factor"]), "step2-confirmed"
    return float(optimal["selection_best_factor"]), "step2-unconfirmed"


@dataclass(frozen=True)
class Factors:
    """What later runs take from step 2's file: the layer, each group's neurons and optimal factor."""

    path: Path
    sha256: str
    optimal: dict[str, dict | None]
    layer: int | None = None
    groups: dict[str, list[int]] | None = None

    def steering_factor(self, group: str = "high_impact") -> tuple[float | None, str]:
        return steering_factor(self.optimal.get(group))


def read_factors(path: Path) -> Factors:
    """A validated step-2 file."""
    what = "step-2 file"
    data = _check_version(read_json(path, what), path, what)
    _require(data, path, what, {"optimal_factors": dict})
    optimal = data["optimal_factors"]
    if not all(v is None or isinstance(v, dict) and {"factor", "selection_best_factor", "confirmed"} <= set(v)
               for v in optimal.values()):
        raise UsageError(f"{what} {path}: optimal_factors must hold {{factor, selection_best_factor, confirmed}} "
                         "records")
    groups = {name: group.get("neurons", []) for name, group in data.get("groups", {}).items()
              if isinstance(group, dict)}
    return Factors(Path(path), file_digest(path), optimal, data.get("layer"), groups)
