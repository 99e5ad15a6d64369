"""Where a model's weights live and where its computations run, when accelerate's device map has
spread it over GPUs, the CPU and disk (`loading.load_model(..., device="auto")`).

accelerate gives each placed module an `AlignDevicesHook`: it moves the module's inputs to the
module's execution device and, for an offloaded module, loads the module's weights from their CPU
copy or from disk (the hook's `weights_map`) just before its forward and drops them after it (the
parameters sit on the meta device in between). Running a module as a module needs nothing more;
code that reads a parameter itself (the written-out mixers, steering, the dt_pre capture) reads it
here. A model that was not dispatched (moved whole with `.to(device)`) answers as a plain module.

Steering an offloaded parameter cannot edit the module's parameter (the hook reloads it at every
forward), so `pin` overlays the hook's weights map with an in-memory copy that the forward reads
from then on; edits to that copy reach the model, and `unpin` returns to the stored weights.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook
from torch import Tensor, nn


def align_hook(module: nn.Module) -> AlignDevicesHook | None:
    """The accelerate hook that places `module`, if it has one."""
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else (hook,)
    return next((h for h in hooks if isinstance(h, AlignDevicesHook)), None)


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its (or its first placed submodule's) hook's execution device, else
    the device of its first tensor that is not on the meta device, else the CPU."""
    for sub in module.modules():
        hook = align_hook(sub)
        if hook is not None and hook.execution_device is not None:
            return torch.device(hook.execution_device)
    tensors = (t for t in (*module.parameters(), *module.buffers()) if t.device.type != "meta")
    return next((t.device for t in tensors), torch.device("cpu"))


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: the execution device of its input embeddings."""
    return execution_device(model.get_input_embeddings())


def devices(model: nn.Module) -> list[torch.device]:
    """Every device the model computes on (its modules' execution devices), in a fixed order."""
    found = {execution_device(m) for m in model.modules() if align_hook(m) is not None}
    found = found or {t.device for t in model.parameters() if t.device.type != "meta"} or {torch.device("cpu")}
    return sorted(found, key=str)


def offloaded(module: nn.Module, name: str) -> bool:
    """Whether `module.<name>` (its own parameter or buffer) is offloaded: stored on the CPU or disk
    and loaded by its hook at each forward."""
    hook = align_hook(module)
    return getattr(module, name).device.type == "meta" and hook is not None and hook.offload


def weight(module: nn.Module, name: str) -> Tensor:
    """`module.<name>` (its own parameter or buffer) as a forward of the module sees it: the tensor
    itself where it is resident, else loaded from where it is offloaded, on the execution device."""
    tensor = getattr(module, name)
    if not offloaded(module, name):
        return tensor
    hook = align_hook(module)
    return hook.weights_map[name].to(device=execution_device(module), dtype=tensor.dtype)


class _Overlay(Mapping):
    """A hook's weights map with some entries replaced by in-memory tensors."""

    def __init__(self, stored: Mapping):
        self.stored, self.pinned = stored, {}

    def __getitem__(self, key: str) -> Tensor:
        return self.pinned[key] if key in self.pinned else self.stored[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)


def pin(module: nn.Module, name: str) -> Tensor:
    """The tensor that forwards of `module` read `<name>` from, which an in-place edit changes for
    every later forward: the parameter itself where it is resident; where it is offloaded, a copy in
    CPU memory that the module's hook reads in place of the stored weight until `unpin`."""
    if not offloaded(module, name):
        return getattr(module, name)
    hook = align_hook(module)
    if not isinstance(hook.weights_map, _Overlay):
        hook.weights_map = _Overlay(hook.weights_map)
    overlay = hook.weights_map
    if name not in overlay.pinned:
        overlay.pinned[name] = overlay.stored[name].to(getattr(module, name).dtype).clone()
    return overlay.pinned[name]


def unpin(module: nn.Module, name: str) -> None:
    """Forwards of `module` read `<name>` from where it is stored again (nothing for a resident one)."""
    hook = align_hook(module)
    overlay = getattr(hook, "weights_map", None)
    if isinstance(overlay, _Overlay):
        overlay.pinned.pop(name, None)
        if not overlay.pinned:
            hook.weights_map = overlay.stored
