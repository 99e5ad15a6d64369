"""Loading a selective-SSM language model and its tokenizer from a local directory or a Hub id.

Local directories are validated before anything is loaded. HF-format checkpoints of every family
in `sites.FAMILIES` (Mamba-1, Falcon-Mamba, Mamba-2 and the hybrids) load through transformers'
Auto classes; original `state-spaces/mamba-*` and `state-spaces/mamba2-*` checkpoints (`d_model` /
`n_layer` / `ssm_cfg` config, `pytorch_model.bin`) are converted in memory and use the GPT-NeoX-20B
tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch
import transformers
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import compute_module_sizes, get_balanced_memory
from huggingface_hub import hf_hub_download
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Mamba2Config,
    MambaConfig,
)

from ..cli import check_device, check_output_dir, parse_max_memory
from ..errors import UsageError
from .placement import input_device
from .sites import FAMILIES, Shape, family_of, meta_model, shape_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ORIGINAL_TOKENIZER = "EleutherAI/gpt-neox-20b"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """A checked model location: where it is, its raw config, and whether it is an original checkpoint."""

    name: str  # as the user gave it
    path: str  # local directory (expanded) or Hub id
    local: bool
    config: dict
    original: bool
    tokenizer: str | None
    revision: str | None = None
    # the weights as (name, tensor) pairs, for a model held in memory (default: the checkpoint's files)
    tensors: Callable[[], list[tuple[str, StoredTensor]]] | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def model_config(self):
        """The transformers config object (converted for an original checkpoint)."""
        if self.original:
            return convert_original_config(self.config)
        return AutoConfig.from_pretrained(self.path, revision=self.revision)

    @functools.cached_property
    def structure(self) -> torch.nn.Module:
        """The model without weights (meta device), built once for the shape and the digest."""
        return meta_model(self.model_config)

    @functools.cached_property
    def shape(self) -> Shape:
        """Layers and delta neurons from the config alone, to check arguments before loading."""
        return shape_of(self.structure)

    @functools.cached_property
    def digest(self) -> str:
        """The model's identity, known before its weights load: the fingerprint of its configuration
        and of its stored weights (see weights_fingerprint)."""
        tensors = self.tensors() if self.tensors is not None else checkpoint_tensors(self)
        return weights_fingerprint(config_digest(self.model_config, self.structure), tensors)

    @property
    def family(self) -> str:
        return self.model_config.model_type


# config keys that say where or with which software a model was saved, not what it is
UNIDENTIFYING_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                      "_attn_implementation_autoset", "architectures")


def config_digest(config, structure: torch.nn.Module) -> str:
    """SHA-256 of a transformers config (canonical JSON, less UNIDENTIFYING_KEYS) and of the names and
    shapes of the parameters of the model it makes (`structure`): equal for the same architecture and
    sizes in any dtype or folder."""
    fields = {k: v for k, v in config.to_dict().items() if k not in UNIDENTIFYING_KEYS}
    shapes = [(name, list(p.shape)) for name, p in structure.named_parameters()]
    text = json.dumps({"config": fields, "parameters": shapes}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# The weights' fingerprint: each stored tensor's name, dtype and shape and its bytes, all of them
# when the weights total at most WHOLE_BYTES, else SAMPLE_BLOCKS evenly spaced blocks of BLOCK_BYTES
# of each tensor (its first and last included; a tensor smaller than the blocks whole).
WHOLE_BYTES = 64 * 2**20
SAMPLE_BLOCKS, BLOCK_BYTES = 16, 4096
STORED_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}  # safetensors' dtype names


@dataclass(frozen=True)
class StoredTensor:
    """A weight as the fingerprint reads it: its dtype (safetensors' name), shape, size in bytes, and
    `read(offset, length)` giving those of its bytes."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    read: Callable[[int, int], bytes]


def fingerprint_spans(nbytes: int, whole: bool) -> list[tuple[int, int]]:
    """The (offset, length) byte ranges of a tensor of `nbytes` that the fingerprint hashes."""
    if whole or nbytes <= SAMPLE_BLOCKS * BLOCK_BYTES:
        return [(0, nbytes)]
    step = (nbytes - BLOCK_BYTES) // (SAMPLE_BLOCKS - 1)
    return [(i * step, BLOCK_BYTES) for i in range(SAMPLE_BLOCKS - 1)] + [(nbytes - BLOCK_BYTES, BLOCK_BYTES)]


def weights_fingerprint(config: str, tensors: list[tuple[str, StoredTensor]]) -> str:
    """SHA-256 of the config digest and, tensor by tensor in name order, its name, dtype, shape and
    the bytes `fingerprint_spans` picks: equal for the same weights in any folder or file layout."""
    whole = sum(t.nbytes for _, t in tensors) <= WHOLE_BYTES
    digest = hashlib.sha256(config.encode())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(json.dumps([name, tensor.dtype, list(tensor.shape)]).encode())
        for offset, length in fingerprint_spans(tensor.nbytes, whole):
            digest.update(tensor.read(offset, length))
    return digest.hexdigest()


def safetensors_tensors(path: Path) -> list[tuple[str, StoredTensor]]:
    """The tensors of a safetensors file, from its header, their bytes read from the file on demand."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size > 8 + size else np.zeros(0, np.uint8)
    start = 8 + size

    def reader(begin: int) -> Callable[[int, int], bytes]:
        return lambda offset, length: data[start + begin + offset: start + begin + offset + length].tobytes()

    return [(name, StoredTensor(entry["dtype"], tuple(entry["shape"]), entry["data_offsets"][1] -
                                entry["data_offsets"][0], reader(entry["data_offsets"][0])))
            for name, entry in header.items() if name != "__metadata__"]


def memory_tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, StoredTensor]]:
    """The tensors of a state dict, each storage once (a tied weight under its first name in order,
    as safetensors stores it); a tensor without data (on the meta device) by its name, dtype and shape."""
    seen, tensors = set(), []
    for name in sorted(state):
        tensor = state[name].detach()
        key = (tensor.device, tensor.data_ptr(), tensor.nbytes) if tensor.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        flat = tensor.reshape(-1).view(torch.uint8) if tensor.device.type != "meta" else None
        read = (lambda offset, length, flat=flat: flat[offset: offset + length].cpu().numpy().tobytes()) \
            if flat is not None else (lambda offset, length: b"")
        tensors.append((name, StoredTensor(STORED_NAMES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape),
                                           tensor.numel() * tensor.element_size(), read)))
    return tensors


def checkpoint_tensors(source: "ModelSource") -> list[tuple[str, StoredTensor]]:
    """The tensors of the checkpoint's weight files (safetensors where it has them, as transformers
    loads them), read on demand."""
    files = weight_paths(source)
    if files[0].suffix == ".safetensors":
        return [tensor for path in files for tensor in safetensors_tensors(path)]
    state = {}
    for path in files:
        state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return memory_tensors(state)


def weight_paths(source: "ModelSource") -> list[Path]:
    """The weight files that load: the safetensors files if there are any, else the .bin files (for
    a Hub id, fetched into the cache, where loading finds them)."""
    if source.local:
        files = _weight_files(Path(source.path))
        return [f for f in files if f.suffix == ".safetensors"] or files
    from huggingface_hub import list_repo_files

    try:
        names = list_repo_files(source.path, revision=source.revision)
        chosen = sorted(n for n in names if n.startswith("model") and n.endswith(".safetensors")) or \
            sorted(n for n in names if n.startswith("pytorch_model") and n.endswith(".bin"))
        return [Path(hf_hub_download(source.path, name, revision=source.revision)) for name in chosen]
    except Exception as e:  # offline, unknown repo, gated
        raise UsageError(f"cannot fetch the weights of {source.name!r} from the Hugging Face Hub "
                         f"({type(e).__name__}); pass a local model directory instead") from None


def looks_like_path(name: str) -> bool:
    """Paths start with . / ~ or have more separators than a Hub id ("owner/name")."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("model*.safetensors")) + sorted(directory.glob("pytorch_model*.bin"))


def validate_local_dir(directory: Path, original_format: bool, tokenizer: str | None) -> None:
    """Raise UsageError listing every required file that the checkpoint directory lacks."""
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("config.json")
    if not _weight_files(directory):
        missing.append("weights (model.safetensors, model-*-of-*.safetensors or pytorch_model.bin)")
    if not original_format and tokenizer is None and not any((directory / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json or tokenizer_config.json)")
    if missing:
        raise UsageError(f"model directory {directory} is missing: {', '.join(missing)}")


def read_config(source: str, revision: str | None) -> dict:
    """The raw config.json of a local directory or Hub repo."""
    if Path(source).is_dir():
        path = Path(source) / "config.json"
        if not path.is_file():
            raise UsageError(f"model directory {source} is missing: config.json")
    else:
        try:
            path = hf_hub_download(source, "config.json", revision=revision)
        except Exception as e:  # offline, unknown repo, gated
            raise UsageError(
                f"cannot fetch model {source!r} from the Hugging Face Hub ({type(e).__name__}); "
                "pass a local model directory instead (see models/README.md)") from None
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"config.json of {source} is not valid JSON: {e}") from None


def is_original_format(config: dict) -> bool:
    return "model_type" not in config and "d_model" in config and "n_layer" in config


def check_model_source(name: str, tokenizer: str | None = None, revision: str | None = None) -> ModelSource:
    """Check a model argument without loading weights: the directory and its files, or the Hub
    repo's config, and that it is a family with delta neurons. Cheap: run before anything slower."""
    path = os.path.expanduser(name)
    local = Path(path).exists()
    if local and not Path(path).is_dir():
        raise UsageError(f"model path {path} is a file; pass the checkpoint directory")
    if not local and (looks_like_path(name) or Path(path).parent.is_dir() and Path(path).parent != Path(".")):
        raise UsageError(f"local model directory not found: {name}")  # e.g. models/mamba-tiny-dmeo
    if tokenizer is not None and looks_like_path(tokenizer) and not Path(tokenizer).expanduser().exists():
        raise UsageError(f"tokenizer directory not found: {tokenizer}")
    config = read_config(path, revision)
    original = is_original_format(config)
    if not original and config.get("model_type") not in FAMILIES:
        raise UsageError(f"{name} is not a selective-SSM model this tool knows (model_type "
                         f"{config.get('model_type')!r}); supported: {', '.join(FAMILIES)}")
    if local:
        validate_local_dir(Path(path), original, tokenizer)
    source = ModelSource(name, path, local, config, original, tokenizer, revision)
    if original:
        source.model_config  # an unsupported original configuration fails here, with one line
    return source


# the defaults of mamba_ssm's Mamba2 block, for an original config's ssm_cfg
MAMBA2_SSM_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None, ngroups=1, rmsnorm=True,
                           norm_before_gate=False, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                           dt_limit=(0.0, float("inf")), bias=False, conv_bias=True, chunk_size=256,
                           D_has_hdim=False)


def convert_original_config(config: dict):
    """MambaConfig or Mamba2Config for an original state-spaces checkpoint config (d_model, n_layer,
    ssm_cfg; `"layer": "Mamba2"` in ssm_cfg for Mamba-2)."""
    ssm = dict(config.get("ssm_cfg", {}) or {})
    multiple = config.get("pad_vocab_size_multiple", 8)
    common = dict(vocab_size=math.ceil(config["vocab_size"] / multiple) * multiple, hidden_size=config["d_model"],
                  num_hidden_layers=config["n_layer"], residual_in_fp32=config.get("residual_in_fp32", True),
                  layer_norm_epsilon=1e-5, tie_word_embeddings=config.get("tie_embeddings", True),
                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if ssm.pop("layer", "Mamba1") != "Mamba2":
        return MambaConfig(state_size=ssm.get("d_state", 16), expand=ssm.get("expand", 2),
                           conv_kernel=ssm.get("d_conv", 4), time_step_rank=ssm.get("dt_rank", "auto"),
                           use_bias=ssm.get("bias", False), use_conv_bias=ssm.get("conv_bias", True), **common)
    unknown = sorted(set(ssm) - set(MAMBA2_SSM_DEFAULTS))
    ssm = {**MAMBA2_SSM_DEFAULTS, **ssm}
    d_inner = ssm["expand"] * config["d_model"]
    if unknown or config.get("d_intermediate") or config.get("attn_layer_idx") or ssm["d_ssm"] not in (None, d_inner) \
            or ssm["norm_before_gate"] or not ssm["rmsnorm"] or ssm["D_has_hdim"] or not config.get("rms_norm", True):
        raise UsageError("this original Mamba-2 checkpoint has parts transformers' Mamba2ForCausalLM cannot hold "
                         "(MLP or attention layers, d_ssm, norm_before_gate, LayerNorm or unknown ssm_cfg keys "
                         f"{unknown}); convert it to the HF format with its own tools")
    return Mamba2Config(state_size=ssm["d_state"], conv_kernel=ssm["d_conv"], expand=ssm["expand"],
                        head_dim=ssm["headdim"], num_heads=d_inner // ssm["headdim"], n_groups=ssm["ngroups"],
                        use_bias=ssm["bias"], use_conv_bias=ssm["conv_bias"], chunk_size=ssm["chunk_size"],
                        time_step_min=ssm["dt_min"], time_step_max=ssm["dt_max"], time_step_floor=ssm["dt_init_floor"],
                        time_step_limit=tuple(ssm["dt_limit"]), **common)


def convert_original_state_dict(state_dict: dict) -> dict:
    """Rename original mamba_ssm parameter names to transformers' names (Mamba-1 and Mamba-2 alike:
    only the embedding differs)."""
    return {key.replace("backbone.embedding.", "backbone.embeddings."): value for key, value in state_dict.items()}


def _load_original(source: ModelSource, dtype: torch.dtype):
    """An original-format checkpoint: read whole into CPU memory and converted there."""
    weights = Path(source.path) / "pytorch_model.bin" if source.local else \
        hf_hub_download(source.path, "pytorch_model.bin", revision=source.revision)
    model = AutoModelForCausalLM.from_config(source.model_config)
    state_dict = convert_original_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise UsageError(f"original-format checkpoint {source.name} does not match {type(model).__name__}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(dtype)


def load_tokenizer(source: str, revision: str | None = None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as e:
        raise UsageError(f"cannot load tokenizer {source!r}: {str(e).splitlines()[0]}; "
                         "pass --tokenizer PATH to a local tokenizer directory") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_device(requested: str) -> str:
    """The requested device, or CPU with one warning line when CUDA is asked for but absent."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        print("warning: CUDA is not available, running on CPU (slow)", file=sys.stderr)
        return "cpu"
    return requested


def size_text(size: float) -> str:
    """Bytes for people, in powers of 1024: 251.6 KiB, 28.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def model_bytes(source: ModelSource, dtype: str) -> int:
    """The model's weights in `dtype`, from its structure alone (no weight read)."""
    return compute_module_sizes(source.structure, dtype=DTYPES[dtype])[""]


def free_bytes(device: int | str) -> int | None:
    """Bytes free now on a GPU (by index) or in the CPU's memory (available RAM); None where unknown."""
    if device == "cpu":
        return psutil.virtual_memory().available
    if isinstance(device, int):
        return torch.cuda.mem_get_info(device)[0]
    return None


def device_key(device: str) -> int | str:
    """accelerate's name for a torch device: a GPU's index, else the device's kind."""
    device = torch.device(device)
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return device.type


def device_budget(max_memory: str | dict | None) -> dict[int | str, int]:
    """What each device may hold: with --max_memory, the devices it names, each at most what it has
    free; without, 90% of what every GPU and the CPU have free (as transformers' "auto" keeps)."""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    if max_memory is None:
        return {device: int(0.9 * free_bytes(device)) for device in [*gpus, "cpu"]}
    asked = parse_max_memory(max_memory) if isinstance(max_memory, str) else dict(max_memory)
    absent = [str(d) for d in asked if d != "cpu" and d not in gpus]
    if absent:
        have = f"GPUs {', '.join(map(str, gpus))}" if gpus else "no GPU"
        raise UsageError(f"--max_memory names GPU {absent[0]}, which this machine does not have (it has {have})")
    return {device: min(size, free_bytes(device)) for device, size in asked.items()}


def device_name(device: int | str) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def budget_text(budget: dict[int | str, int], asked: bool) -> str:
    """'cpu 39.1 KiB allowed of 20.1 GiB free; cuda:0 ...' (or '... 90% of 20.1 GiB free')."""
    allowed = "allowed" if asked else "(90%)"
    return "; ".join(f"{device_name(d)} {size_text(b)} {allowed} of {size_text(free_bytes(d))} free"
                     for d, b in budget.items())


def half_hint(source: ModelSource, dtype: str, room: int) -> str:
    """', or --dtype bfloat16 (size)' where the model is in float32 and would fit `room` bytes in bfloat16."""
    half = model_bytes(source, "bfloat16")
    return f", or --dtype bfloat16 ({size_text(half)})" if dtype == "float32" and half <= room else ""


def mapped_device(device_map: dict, name: str) -> int | str:
    """Where a device map puts module `name`: the entry of its longest prefix."""
    prefixes = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(prefixes, key=len)]


def plan_device_map(source: ModelSource, dtype: str, max_memory: str | dict | None,
                    offload_folder: str | None) -> dict[str, int | str]:
    """accelerate's device map for the model over the devices' budgets (balanced over the GPUs, then
    the CPU, then disk), computed on its structure before any weight is read; a UsageError (one line:
    the size, the budgets and what is free, the flags that make it fit) when it needs disk and no
    `offload_folder` is given, or leaves the input embeddings no memory (inputs go where they are)."""
    structure, budget, torch_dtype = source.structure, device_budget(max_memory), DTYPES[dtype]
    no_split = structure._no_split_modules
    balanced = get_balanced_memory(structure, max_memory=budget, no_split_module_classes=no_split, dtype=torch_dtype)
    device_map = infer_auto_device_map(structure, max_memory=balanced, no_split_module_classes=no_split,
                                       dtype=torch_dtype)
    sizes, limits = compute_module_sizes(structure, dtype=torch_dtype), budget_text(budget, max_memory is not None)
    embeddings = next(n for n, m in structure.named_modules() if m is structure.get_input_embeddings())
    if mapped_device(device_map, embeddings) == "disk":
        raise UsageError(f"the memory {source.name} may use ({limits}) leaves no room for its input embeddings "
                         f"({size_text(sizes[embeddings])}), which must stay in memory: raise --max_memory")
    on_disk = [name for name, where in device_map.items() if where == "disk"]
    if on_disk and offload_folder is None:
        named = ", ".join(on_disk[:2]) + ", ..." * (len(on_disk) > 2)
        left = f"{size_text(sum(sizes[n] for n in on_disk))} of it ({named})"
        raise UsageError(f"{source.name} ({size_text(sizes[''])} in {dtype}) does not fit the memory it may use "
                         f"({limits}): accelerate's device map leaves {left} for disk; add --offload_folder DIR to "
                         f"keep that there{', or raise --max_memory' if max_memory is not None else ''}"
                         f"{half_hint(source, dtype, sum(budget.values()))}")
    return device_map


SPREAD = "use --device auto --offload_folder DIR to spread it over the GPUs, the CPU and disk"
CONVERT = ("an original-format checkpoint is read whole into CPU memory before it is spread: convert it to the HF "
           "format (save_pretrained) to load it piece by piece")


def check_fits(source: ModelSource, device: str, dtype: str, advice: str = SPREAD) -> None:
    """A UsageError (one line: the size, what is free, `advice`) when the model's weights need more
    than `device` has free, before any weight is read."""
    free, size = free_bytes(device_key(device)), model_bytes(source, dtype)
    if free is not None and size > free:
        raise UsageError(f"{source.name} needs {size_text(size)} in {dtype} but {device} has {size_text(free)} free: "
                         f"{advice}{half_hint(source, dtype, free)}")


def _load_weights(source: ModelSource, device: str, dtype: str, device_map: dict | None, offload_folder: str | None):
    """The model with its weights, placed on `device`, or spread as `device_map` says (an original
    checkpoint converted in CPU memory first, then dispatched by accelerate)."""
    if source.original:
        model = _load_original(source, DTYPES[dtype])
        return model.to(device) if device_map is None else dispatch_model(model, device_map, offload_dir=offload_folder)
    placed = {"device_map": device_map, "offload_folder": offload_folder} if device_map is not None else {}
    model = AutoModelForCausalLM.from_pretrained(source.path, revision=source.revision, dtype=DTYPES[dtype], **placed)
    return model.to(device) if device_map is None else model


def device_map_text(device_map: dict) -> str:
    """A device map for people: 'cpu: backbone.embeddings, lm_head; disk: backbone.layers.4-23, backbone.norm_f'."""
    groups: dict[str, list[str]] = {}
    for name, where in device_map.items():
        groups.setdefault(device_name(where), []).append(name or "the whole model")
    parts = []
    for where, names in groups.items():
        numbered: dict[str, list[int]] = {}
        for name in names:
            head, _, last = name.rpartition(".")
            if last.isdigit():
                numbered.setdefault(head, []).append(int(last))
        listed = [n for n in names if not n.rpartition(".")[2].isdigit()]
        listed += [f"{head}.{compact_ranges(ids)}" for head, ids in numbered.items()]
        parts.append(f"{where}: {', '.join(listed)}")
    return "; ".join(parts)


def load_model(source: ModelSource | str, device: str = "cuda", dtype: str = "float32",
               max_memory: str | dict | None = None, offload_folder: str | None = None):
    """(model, tokenizer) in eval mode on `device` (CPU with a warning if CUDA is absent), or with
    device "auto" spread by accelerate's device map over the GPUs, the CPU and disk: each device
    holds at most what `max_memory` allows ("0=70GiB,cpu=100GiB", or accelerate's dict), and the
    layers that fit nowhere stay on disk when `offload_folder` is given. Whether the model fits is
    checked from its structure before any weight is read (a UsageError, one line, when it does not)."""
    transformers.logging.set_verbosity_error()  # not the "reference kernel fallback" notice on every layer
    transformers.logging.disable_progress_bar()  # keep stderr for errors: one line on bad input
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    source = source if isinstance(source, ModelSource) else check_model_source(source)
    device = pick_device(check_device(device))
    if device != "auto" and (max_memory is not None or offload_folder is not None):
        raise UsageError(f"--max_memory and --offload_folder spread the model over devices with --device auto; "
                         f"with --device {device} it is loaded whole there")
    if offload_folder is not None:
        check_output_dir(offload_folder, "--offload_folder")
    device_map = plan_device_map(source, dtype, max_memory, offload_folder) if device == "auto" else None
    if device_map is None:
        check_fits(source, device, dtype)
    elif source.original:
        check_fits(source, "cpu", dtype, CONVERT)
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)  # its offload notice: the line below says it
    model = _load_weights(source, device, dtype, device_map, offload_folder)
    if device_map is not None:
        print(f"device map: {device_map_text(device_map)}")
    if source.original:
        tok = load_tokenizer(source.tokenizer or ORIGINAL_TOKENIZER)
    else:
        tok = load_tokenizer(source.tokenizer or source.path, revision=None if source.tokenizer else source.revision)
    model.eval()
    model.requires_grad_(False)
    model._delta_steering_source = source
    return model, tok


def source_of(model) -> ModelSource:
    """Where a loaded model came from: as `load_model` recorded it, or, for a model loaded some other
    way, its config's name (a local directory, a Hub id) with its config, structure and weights taken
    from the model itself, so that a step run on it checks and records it as the scripts do."""
    recorded = getattr(model, "_delta_steering_source", None)
    if recorded is not None:
        return recorded
    name = getattr(model.config, "_name_or_path", "") or "in-memory model"
    source = ModelSource(name, name, Path(name).is_dir(), model.config.to_dict(), False, None,
                         tensors=lambda: memory_tensors(model.state_dict()))
    source.__dict__.update(model_config=model.config, structure=model)  # the cached properties, from the model
    return source


def load_mamba_model(model_name_or_path: str, device: str = "cuda", dtype: str = "float32",
                     revision: str | None = None, tokenizer: str | None = None, max_memory: str | dict | None = None,
                     offload_folder: str | None = None):
    """(model, tokenizer) from a local directory or Hub id: check_model_source, then load_model."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return load_model(check_model_source(model_name_or_path, tokenizer, revision), device, dtype, max_memory,
                      offload_folder)


def ssm_backend() -> str:
    """Which SSM implementation the installed transformers will run."""
    fused = importlib.util.find_spec("mamba_ssm") and importlib.util.find_spec("causal_conv1d")
    if fused and torch.cuda.is_available():
        return "fused CUDA kernels (mamba_ssm + causal_conv1d)"
    if importlib.util.find_spec("mambapy"):
        return "torch reference scan (mambapy parallel scan available when use_mambapy=True)"
    return "torch reference scan (sequential)"


def describe(model) -> dict:
    """Summary of a loaded model for run records and the CLI: its family, SSM layers and what a delta
    neuron is."""
    source = source_of(model)
    device_map = getattr(model, "hf_device_map", None)
    shape, family = shape_of(model), family_of(model)
    return {
        "model": source.name,
        "revision": source.revision or getattr(model.config, "_commit_hash", None),
        "original_format": source.original,
        "family": family.name,
        "layers": shape.num_layers,
        "ssm_layers": compact_ranges(shape.ssm_layers),
        "hidden_size": model.config.hidden_size,
        "delta_neurons_per_layer": shape.delta_neurons,
        "delta_neuron": family.neuron,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": f"auto ({device_map_text(device_map)})" if device_map else str(input_device(model)),
        "dtype": str(model.dtype).replace("torch.", ""),
        "ssm_backend": ssm_backend(),
    }


def compact_ranges(ids) -> str:
    """0,1,2,3,5 -> "0-3,5"."""
    ids, parts = sorted(ids), []
    for i in ids:
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)
