"""A steered model written as an ordinary checkpoint that any tool loads without this project.

Steering is an exact edit of the rows that make `dt_pre` (steering.py), so a steered model *is* a
checkpoint: the source's weight files with those rows replaced by the steered model's, every other
tensor copied byte for byte in its own dtype, plus the config, generation config and tokenizer, and
`steering.json`: what was applied, to which source (name, fingerprint and weight-file digests) and
how to undo it (the original values of every edited row).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import UsageError
from ..intervention import Steering
from ..results_io import file_digest, write_json
from .placement import offloaded, weight
from .sites import delta_site, family_of, meta_model
from .steering import apply

STEERING_FILE = "steering.json"
FORMAT_VERSION = 1
CONFIG_FILES = ("config.json", "generation_config.json")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors weight files of a checkpoint directory (one file, or the shards of its index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise UsageError(f"{directory} has no safetensors weights (model.safetensors or its index); export writes "
                     "safetensors from safetensors: convert the checkpoint first (save_pretrained)")


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes a tensor covers (a view of contiguous rows, or a whole parameter)."""
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def sharers(model: nn.Module, tensor: torch.Tensor) -> list[str]:
    """Every name of a parameter or buffer whose memory overlaps `tensor` (tied ones have several)."""
    lo, hi = _span(tensor)
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, other in named if _span(other)[0] < hi and lo < _span(other)[1]]


def architecture(model: nn.Module) -> nn.Module:
    """The model built again from its config on the meta device (its ties as designed), once per model."""
    if "_delta_steering_architecture" not in model.__dict__:  # a plain attribute: not a submodule
        model.__dict__["_delta_steering_architecture"] = meta_model(model.config)
    return model.__dict__["_delta_steering_architecture"]


def tied_names(model: nn.Module, name: str) -> list[str]:
    """`name` and every other name of the same parameter, as the model is placed: by memory where
    the parameter is resident; by the architecture's ties (the model built again on the meta device)
    where accelerate offloaded it, since its memory is then on the CPU or disk, out of sight."""
    module_name, _, attribute = name.rpartition(".")
    if not offloaded(model.get_submodule(module_name), attribute):
        return [name, *(other for other in sharers(model, model.get_parameter(name)) if other != name)]
    structure = architecture(model)
    parameter = structure.get_parameter(name)
    return [name, *(other for other, p in structure.named_parameters(remove_duplicate=False)
                    if p is parameter and other != name)]


def site_parameters(model: nn.Module, layer: int) -> dict[str, tuple[nn.Module, str]]:
    """Name -> (module, attribute) of every parameter that layer `layer`'s delta site views."""
    qualified = {module: name for name, module in model.named_modules()}
    found = {}

    def record(module: nn.Module, attribute: str) -> torch.Tensor:
        found[f"{qualified[module]}.{attribute}"] = (module, attribute)
        return getattr(module, attribute)

    delta_site(model, layer, record)
    return found


def edited_parameters(model: nn.Module, layers: list[int]) -> dict[str, tuple[nn.Module, str]]:
    """Name -> (module, attribute) of every parameter the delta sites of `layers` view; a UsageError
    (one line) when one is stored under several names (tied or shared), so that editing it changes
    them all."""
    edited = {}
    for layer in layers:
        for name, place in site_parameters(model, layer).items():
            owners = tied_names(model, name)
            if len(owners) != 1:
                raise UsageError(f"layer {layer}'s delta site {owners[0]} shares its memory with "
                                 f"{', '.join(owners[1:])}: steering it would change them too, so it cannot be "
                                 "exported as one edit")
            edited[name] = place
    return edited


def steered_values(model: nn.Module, steerings: list[Steering]) -> tuple[dict, dict]:
    """(original, steered) CPU copies of every edited parameter, by name, wherever the model placed
    it: the steerings installed together (`steering.apply`), read, and removed again."""
    params = edited_parameters(model, sorted({s.layer for s in steerings}))

    def read() -> dict[str, torch.Tensor]:
        return {name: weight(module, attribute).detach().to("cpu", copy=True)
                for name, (module, attribute) in params.items()}

    original = read()
    with apply(model, steerings):
        steered = read()
    return original, steered


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 1 else tensor.reshape(-1, 1)


def undo_record(original: torch.Tensor, steered: torch.Tensor) -> dict:
    """The rows (of the tensor as rows x last dim) that steering changed and their original values:
    writing them back restores the source tensor exactly."""
    before, after = _rows(original), _rows(steered)
    changed = (before != after).any(dim=1).nonzero().flatten().tolist()
    return {"dtype": str(original.dtype).removeprefix("torch."), "shape": list(original.shape), "rows": changed,
            "original": before[changed].double().tolist()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (dtype, shape and bytes)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def _common_suffix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(reversed(a.split(".")), reversed(b.split("."))):
        if x != y:
            break
        count += 1
    return count


def stored_keys(files: list[Path], loaded: dict[str, torch.Tensor]) -> dict[str, str]:
    """Parameter name -> the weight files' key of the tensor it was loaded from: a stored tensor equal
    to it bit for bit (names can differ: transformers renames some families' keys on load), the one
    whose name ends like the parameter's where several are equal. A parameter with no such tensor
    (converted on load: another dtype or layout) is refused, since the export would not be the model."""
    candidates: dict[str, list[str]] = {name: [] for name in loaded}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                shape = list(f.get_slice(key).get_shape())
                matching = [name for name, t in loaded.items() if list(t.shape) == shape]
                stored = f.get_tensor(key) if matching else None
                candidates.update({name: candidates[name] + [key] for name in matching
                                   if _same(stored, loaded[name])})
    keys = {}
    for name, found in candidates.items():
        if not found:
            raise UsageError(f"no tensor of the weight files equals {name} as loaded (stored in another dtype or "
                             "layout?): cannot place the steered rows")
        keys[name] = max(found, key=lambda k: _common_suffix(k, name))
    return keys


def write_weights(files: list[Path], steered: dict[str, torch.Tensor], out: Path) -> None:
    """Each source weight file rewritten under `out` with the `steered` tensors (by stored key) in
    place of their originals, every other tensor as stored, the file's metadata kept."""
    for path in files:
        with safe_open(path, framework="pt") as f:
            tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
        tensors.update({key: steered[key].contiguous() for key in tensors.keys() & steered.keys()})
        save_file(tensors, out / path.name, metadata=metadata)


def export_steered(model: nn.Module, tokenizer, source_dir: Path, source_name: str, fingerprint: str,
                   steerings: list[Steering], out: Path, **provenance) -> dict:
    """Write the steered checkpoint to `out`; return steering.json's contents (also written there):
    the source by name, fingerprint (`loading.weights_fingerprint`) and each weight file's SHA-256."""
    files = weight_files(source_dir)
    original, steered = steered_values(model, steerings)
    keys = stored_keys(files, original)
    original = {keys[name]: tensor for name, tensor in original.items()}
    steered = {keys[name]: tensor for name, tensor in steered.items()}
    out.mkdir(parents=True, exist_ok=True)
    write_weights(files, steered, out)
    index = source_dir / "model.safetensors.index.json"
    for path in [source_dir / name for name in CONFIG_FILES] + [index]:
        if path.is_file():
            shutil.copyfile(path, out / path.name)
    if not (out / "generation_config.json").is_file() and model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "format_version": FORMAT_VERSION,
        "description": ("A steered checkpoint: the source's weights with the rows that make dt_pre edited as `steering` "
                        "says (scale: rows and bias times the factor; set: rows 0, bias the value), every other tensor "
                        "byte-identical. To undo: write each tensor's `original` rows back (exact)."),
        "source": {"model": source_name, "family": family_of(model).name, "fingerprint": fingerprint,
                   "weight_files": {f.name: file_digest(f) for f in files}},
        "steering": [s.to_json() for s in steerings],
        "undo": {name: undo_record(original[name], steered[name]) for name in sorted(steered)},
        **provenance,
    }
    write_json(out / STEERING_FILE, record)
    return record
