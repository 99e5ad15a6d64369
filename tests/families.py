"""Tiny random models of every selective-SSM family in transformers, and an independent reference for
steering them: dt_pre rewritten where the mixer's scan function is entered (the mixer's own slow
path), never through the project's weight edit or site description."""

from __future__ import annotations

import functools
import importlib
import inspect
from contextlib import contextmanager

import torch
import transformers

VOCAB = 100
# family: (config class, causal LM class, kind, config arguments) - hybrids mix SSM and attention layers
TINY = {
    "mamba": ("MambaConfig", "MambaForCausalLM", "mamba1", dict(
        hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4)),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM", "mamba1", dict(
        hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4)),
    "jamba": ("JambaConfig", "JambaForCausalLM", "mamba1", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
        mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)),
    "zamba": ("ZambaConfig", "ZambaForCausalLM", "zamba", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
        n_mamba_heads=2, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"])),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", "mamba2", dict(
        hidden_size=16, num_heads=4, head_dim=8, state_size=4, n_groups=2, num_hidden_layers=2, expand=2,
        conv_kernel=4, chunk_size=4)),
    "bamba": ("BambaConfig", "BambaForCausalLM", "mamba2", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=4,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4)),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", "mamba2", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
        n_mamba_heads=4, mamba_ngroups=2, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, chunk_size=4,
        adapter_rank=4, layers_block_type=["mamba", "hybrid", "mamba"])),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", "mamba2", dict(
        hidden_size=16, layers_block_type=["mamba", "attention", "mlp"], num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_size=32, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
        ssm_state_size=4, conv_kernel=4, chunk_size=4)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", "mamba2", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_local_experts=0, shared_intermediate_size=32, layer_types=["mamba", "attention"], mamba_n_heads=4,
        mamba_d_head=8, mamba_n_groups=2, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4)),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", "mamba2", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=4, mamba_d_conv=4,
        mamba_expand=2, mamba_chunk_size=4, mamba_rms_norm=True, ssm_multipliers=[1.0, 1.0, 1.0, 1.0, 0.5],
        ssm_in_multiplier=1.5)),
}
SCAN_FUNCTIONS = {"mamba1": ("mamba_selective_scan", "mamba_selective_state_update"),
                  "zamba": ("mamba_selective_scan", "mamba_selective_state_update"),
                  "mamba2": ("mamba2_chunk_scan", "mamba2_selective_state_update")}


def tiny_config(name: str, **overrides):
    config_class, _, _, settings = TINY[name]
    return getattr(transformers, config_class)(**{"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 0,
                                                  "eos_token_id": 0, **settings, **overrides})


def ssm_mixers(model) -> dict[int, torch.nn.Module]:
    """Layer -> SSM mixer, found by class name (not through the project's site table)."""
    out = {}
    for i, block in enumerate(model.base_model.layers):
        for name in ("mixer", "mamba", "mamba_decoder"):
            module = getattr(block, name, None)
            module = getattr(module, "mamba", module) if name == "mamba_decoder" else module
            if module is not None and "Attention" not in type(module).__name__ and hasattr(module, "A_log"):
                out[i] = module
                break
    return out


def make_tiny(name: str, seed: int = 0, **overrides):
    """A tiny random model of family `name` in eval mode, its matrices drawn with std 1/sqrt(fan_in)
    and its time-step biases spread (the hybrids' default init makes steering invisible at this size)."""
    _, model_class, kind, _ = TINY[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(tiny_config(name, **overrides)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
        for block in ssm_mixers(model).values():
            bias = block.dt_bias if kind == "mamba2" else block.dt_proj.bias if kind == "mamba1" else block.dt_proj_bias
            bias.copy_(torch.randn_like(bias))
    return model


@contextmanager
def patch_dt_pre(model, name: str, layer: int, neurons, factor=None, value=None, seen=None):
    """While layer `layer`'s mixer runs, rewrite dt_pre = dt + bias where its scan functions (the full
    sequence scan and the cached one-token step) are entered: dt_pre[..., S] *= factor (or = value).
    Zamba's scan runs once per head; neuron h * head_dim + d is channel d of head h. `seen`, a list,
    receives each dt_pre before the rewrite (channels last; zamba: one per head)."""
    _, _, kind, _ = TINY[name]
    target = ssm_mixers(model)[layer]
    module = importlib.import_module(type(target).__module__)
    originals = {fn: getattr(module, fn) for fn in SCAN_FUNCTIONS[kind]}
    state = {"on": False, "head": 0}
    heads = getattr(target, "n_mamba_heads", 1) if kind == "zamba" else 1
    head_dim = getattr(target, "mamba_head_dim", 0)
    wanted = torch.tensor(list(neurons), dtype=torch.long)

    def rewrite(pre, offset):
        if seen is not None:
            seen.append(pre.detach().clone())
        local = wanted - offset
        local = local[(local >= 0) & (local < pre.shape[-1])]
        pre = pre.clone()
        pre[..., local] = pre[..., local] * factor if factor is not None else torch.tensor(value, dtype=pre.dtype)
        return pre

    def wrap(fn_name):
        original = originals[fn_name]
        signature = inspect.signature(getattr(original, "forward", original))  # a hub-kernel wrapper is a module
        bias_key = "delta_bias" if "delta_bias" in signature.parameters else "dt_bias"
        step = fn_name.endswith("state_update")

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if not state["on"]:
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            dt, bias = bound.arguments["dt"], bound.arguments.get(bias_key)
            bias = torch.zeros((), dtype=dt.dtype) if bias is None else bias.to(dt.dtype)
            offset = 0
            if kind == "zamba":
                offset, state["head"] = state["head"] * head_dim, (state["head"] + 1) % heads
            if kind == "mamba2":  # chunk scan: dt (b, L, H); step: dt (b, H, head_dim), all copies equal
                pre = (dt + bias)[..., 0] if step else dt + bias
                new = rewrite(pre, offset)
                new = new[..., None].expand_as(dt) if step else new
            else:  # scan: dt (b, I, L); step: dt (b, I)
                pre = dt + bias if step else (dt + bias[..., None]).transpose(1, 2)
                new = rewrite(pre, offset)
                new = new if step else new.transpose(1, 2)
            bound.arguments["dt"] = new
            bound.arguments[bias_key] = None
            return original(*bound.args, **bound.kwargs)

        return wrapper

    hooks = [target.register_forward_pre_hook(lambda *_: state.update(on=True, head=0)),
             target.register_forward_hook(lambda *_: state.update(on=False))]
    for fn_name in originals:
        setattr(module, fn_name, wrap(fn_name))
    try:
        yield
    finally:
        for fn_name, fn in originals.items():
            setattr(module, fn_name, fn)
        for hook in hooks:
            hook.remove()
