"""A Mamba-2 block (mamba2) taken apart at its delta site, for the fast engine: the pieces block L's
mixer computed on the real forward, one head's selective scan, and block L's output with one head
steered.

A delta neuron is a head h. Changing its dt_pre changes only head h's scan output y_h (the heads are
independent in the scan; B and C come from the conv, upstream of dt; the D skip does not depend on
dt). The gated RMSNorm then rescales every channel of h's group g by the new per-token
r = rsqrt(var' + eps) / rsqrt(var + eps), so with P_g = W_out[:, g] @ normed_g (precomputed)

    out_L' = out_L + (r - 1) P_g + W_out[:, h] @ (w_h * silu(z_h) * (y_h' - y_h) * rsqrt(var' + eps)),

exact algebra, a group term and a head_dim-rank term per neuron.

Also here: the chunk size a Mamba-2 model's forwards scan at on CPU while requests are scored
(`short_chunks`), and a leaner one-token cached step for generation (`lean_state_update`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..intervention import Intervention
from .placement import execution_device, weight
from .sites import decoder_layers, family_of

SHORT_CHUNK = 32  # the smallest chunk size used; 16 was slower on the six tasks' requests
MOST_CHUNKS = 4  # chunks per longest sequence: more adds inter-chunk work (quadratic in chunks)


def chunk_size_for(tokens: int, configured: int) -> int:
    """The chunk size for sequences of up to `tokens` tokens: the smallest power of two from 32
    that splits them into at most 4 chunks, never above the model's own."""
    size = SHORT_CHUNK
    while size * MOST_CHUNKS < tokens:
        size *= 2
    return min(size, configured)


@contextmanager
def short_chunks(model, tokens: int):
    """While open, a Mamba-2 model on CPU scans sequences of up to `tokens` tokens in chunks of
    `chunk_size_for(tokens)`. Transformers' CPU scan pads every sequence to whole chunks and does
    work quadratic in the chunk size within each, so at mamba2's configured 256 a 30-token request
    costs what a 256-token one does. The chunked scan is the same recurrence at any chunk size, so
    the numbers change only by float rounding (about 5e-6 relative on the six tasks' requests) and
    about 3x less time (`benchmarks/bench_scoring.py --family mamba2`). Other families, and mixers
    that compute on CUDA (where a fused kernel may be tuned to the configured size; a model spread
    over devices can have both kinds), are left as they are."""
    mixers = ([block.mixer for block in decoder_layers(model) if execution_device(block.mixer).type == "cpu"]
              if family_of(model).name == "mamba2" else [])
    configured = [mixer.chunk_size for mixer in mixers]
    try:
        for mixer, size in zip(mixers, configured):
            mixer.chunk_size = chunk_size_for(tokens, size)
        yield
    finally:
        for mixer, size in zip(mixers, configured):
            mixer.chunk_size = size


def state_update(reference):
    """transformers' one-token Mamba-2 state update (`reference`: state, x, dt, A, B, C, D, ...), the
    same float32 arithmetic with less of it. transformers expands dt over head_dim and state and A
    over head_dim, so its reference computes exp(dt * A) and dt * B on every element of the state
    (heads x head_dim x state per row) and then copies the new state over the old: here exp runs once
    per head and head_dim (the same inputs, hence the same values), dt * B once per head, and the
    state is updated in place. Other inputs (not float32, dt or A not expanded, off CPU) go to
    `reference`."""

    def update(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kwargs):
        expanded = dt.stride(-1) == 0 and A.stride(-1) == 0 and A.stride(-2) == 0
        if not (expanded and state.device.type == "cpu"
                and all(t.dtype == torch.float32 for t in (state, x, dt, A, B, C))):
            return reference(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, z=z, **kwargs)
        batch, heads, _ = x.shape
        groups, size = B.shape[1], B.shape[-1]
        if dt_bias is not None:
            dt = dt + dt_bias
        if dt_softplus:
            dt = F.softplus(dt)
        decay = torch.exp(dt * A[..., 0])[..., None]  # batch x heads x head_dim x 1

        def per_head(t: Tensor) -> Tensor:  # B or C (batch x groups x state), each group's row for its heads
            return t[:, :, None].expand(batch, groups, heads // groups, size).reshape(batch, heads, size)

        dBx = (dt[:, :, :1, None] * per_head(B)[:, :, None]) * x[..., None]
        state.mul_(decay).add_(dBx)
        out = torch.bmm(state.view(batch * heads, -1, size), per_head(C).reshape(batch * heads, size, 1))
        out = out.view(x.shape)
        if D is not None:
            out = out + x * D
        if z is not None:
            out = out * F.silu(z)
        return out

    update.lean = True  # `lean_state_update` opened inside another leaves it as it is
    return update


def in_place_scan(reference, update):
    """transformers' `mamba2_scan_forward` (`reference`) whose one-token cached step updates the
    cache's SSM state in place with `update` (called as the reference calls its state update, on
    the same inputs). The reference clones the state, updates the clone and copies it back into the
    cache, so that a cache recording its past keeps the old state: two passes over every row's state
    per layer and token that a cache not recording does not need. Other calls go to `reference`."""

    def scan(module, hidden_states, B, C, dt, cache, **kwargs):
        batch, tokens, _ = hidden_states.shape
        state = cache.get_recurrent_state(module.layer_idx) if cache is not None else None
        if state is None or tokens != 1 or cache.is_recording_past(module.layer_idx):
            return reference(module, hidden_states, B, C, dt, cache, **kwargs)
        head_dim, size, groups = module.head_dim, module.ssm_state_size, module.n_groups
        out = update(state, hidden_states.view(batch, module.num_heads, head_dim),
                     dt.transpose(1, 2).expand(-1, -1, head_dim),
                     (-torch.exp(module.A_log.float()))[:, None, None].expand(-1, head_dim, size),
                     B.view(batch, groups, size), C.view(batch, groups, size), module.D[:, None].expand(-1, head_dim),
                     z=None, dt_bias=module.dt_bias[:, None].expand(-1, head_dim), dt_softplus=True, **kwargs)
        return out.view(batch, 1, -1)

    scan.lean = True
    return scan


LEAN = ("mamba2_selective_state_update", "mamba2_scan_forward")  # the module functions `lean_state_update` replaces


@contextmanager
def lean_state_update(model):
    """While open, a Mamba-2 model's one-token cached steps update the SSM state in place
    (`in_place_scan`), on CPU with `state_update`'s lesser arithmetic (a generation step at
    mamba2-130m's shape in 0.7x the time at 8 rows, 0.6x at 16: benchmarks/bench_step.py; the same
    numbers: tests/test_mixer2.py). Other families, and transformers versions without these
    module-level functions, are left as they are; opened inside another, it changes nothing."""
    blocks = decoder_layers(model) if family_of(model).name == "mamba2" else []
    module = sys.modules[type(blocks[0].mixer).__module__] if blocks else None
    references = [getattr(module, name, None) for name in LEAN]
    if None in references or any(getattr(reference, "lean", False) for reference in references):
        yield
        return
    update = state_update(references[0])
    for name, lean in zip(LEAN, (update, in_place_scan(references[1], update))):
        setattr(module, name, lean)
    try:
        yield
    finally:
        for name, reference in zip(LEAN, references):
            setattr(module, name, reference)


@dataclass
class LayerState:
    """Block L on one right-padded example batch, kept while the batch's neurons are swept.
    Token-first like transformers' Mamba-2 mixer: (batch, tokens, ...)."""

    output: Tensor  # the residual stream after block L, from the real block (batch x tokens x hidden)
    x: Tensor  # post-conv activations, per head (batch x tokens x heads x head_dim), model dtype
    B: Tensor  # batch x tokens x groups x state
    C: Tensor  # batch x tokens x groups x state
    dt_lin: Tensor  # in_proj's dt outputs, without dt_bias (batch x tokens x heads), model dtype
    gated: Tensor  # the gated norm's input y * silu(z), per head (batch x tokens x heads x head_dim), float32
    gate: Tensor  # silu(z), per head (batch x tokens x heads x head_dim), float32
    variance: Tensor  # the gated norm's mean square per group (batch x tokens x groups), float32
    projected: Tensor  # P_g = W_out[:, g] @ normed_g (batch x groups x tokens x hidden), float32

    def rows(self, members: list[int]) -> "LayerState":
        """The state of some sequences of the batch."""
        return LayerState(*(t[members] for t in astuple(self)))


@contextmanager
def recorded(mixer):
    """While the mixer runs: in_proj's output and the gated norm's inputs (scan output y, gate z)
    and output, as the model computes them."""
    seen: dict[str, Tensor] = {}
    hooks = [mixer.in_proj.register_forward_hook(lambda _m, _i, out: seen.update(projected=out)),
             mixer.norm.register_forward_hook(lambda _m, inputs, out: seen.update(scan=inputs[0], z=inputs[1],
                                                                                 normed=out))]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def layer_state(model, hidden: Tensor, layer: int) -> LayerState:
    """Block L on the residual stream entering it (`mamba1.block_input`): its real output and the
    pieces its mixer computed (the conv of in_proj's xBC recomputed as transformers'
    `causal_conv1d_fn` computes it)."""
    block = decoder_layers(model)[layer]
    mixer = block.mixer
    with recorded(mixer) as seen:
        output = block(hidden)
    batch, tokens, _ = output.shape
    heads, head_dim, groups, state = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    _, xBC, dt_lin = seen["projected"].split([mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)
    xBC = mixer.act(mixer.conv1d(xBC.transpose(1, 2).to(mixer.conv1d.weight.dtype))[..., :tokens])
    x, B, C = xBC.transpose(1, 2).to(dt_lin.dtype).split([mixer.intermediate_size, groups * state, groups * state], -1)
    gate = F.silu(seen["z"].float())
    gated = seen["scan"].float() * gate
    variance = gated.view(batch, tokens, groups, -1).pow(2).mean(-1)
    columns = weight(mixer.out_proj, "weight").detach().float().view(-1, groups, mixer.intermediate_size // groups)
    projected = torch.einsum("btgc,hgc->bgth", seen["normed"].float().view(batch, tokens, groups, -1), columns)
    per_head = (batch, tokens, heads, head_dim)
    return LayerState(output, x.reshape(per_head), B.reshape(batch, tokens, groups, state),
                      C.reshape(batch, tokens, groups, state), dt_lin, gated.view(per_head), gate.view(per_head),
                      variance, projected)


def head_scan(x: Tensor, dt_pre: Tensor, A: Tensor, B: Tensor, C: Tensor, limit: tuple[float, float]) -> Tensor:
    """Mamba-2's selective scan of single heads without the D skip (it does not depend on dt), in
    float32 as a recurrence over tokens: the SSD chunk scan's result up to float rounding.

    x: (..., tokens, head_dim); dt_pre: (..., tokens); A: (...); B, C: (..., tokens, state), broadcast.
    Returns y (..., tokens, head_dim). Each step keeps one (head_dim x state) state per head and
    example; the outputs are read inside the loop, so the states over tokens are never stored."""
    dt = F.softplus(dt_pre).clamp(*limit).float()
    decay = torch.exp(A.float()[..., None] * dt)  # (..., tokens)
    drive = dt[..., None] * x.float()  # (..., tokens, head_dim)
    B, C = B.float(), C.float()
    state = torch.zeros(*torch.broadcast_shapes(drive.shape[:-2], B.shape[:-2]), x.shape[-1], B.shape[-1],
                        device=x.device)
    ys = []
    for step in range(x.shape[-2]):
        state = decay[..., step, None, None] * state + drive[..., step, :, None] * B[..., step, None, :]
        ys.append((state @ C[..., step, :, None])[..., 0])
    return torch.stack(ys, dim=-2)


def steered_outputs(model, layer: int, state: LayerState, intervention: Intervention) -> Tensor:
    """Block L's output with each head steered alone (see the module docstring), stacked
    (neurons * batch, tokens, hidden), neuron-major. Both scans run through the same code, so
    y_h' - y_h has no offset from summation order."""
    mixer = decoder_layers(model)[layer].mixer
    heads = torch.tensor(intervention.neurons, device=state.x.device)
    groups = heads // (mixer.num_heads // mixer.n_groups)
    lin = state.dt_lin[..., heads].permute(2, 0, 1)  # (neurons, batch, tokens)
    before, after = intervention.dt_pre(lin, weight(mixer, "dt_bias").detach()[heads])
    x = state.x[:, :, heads].permute(2, 0, 1, 3)  # (neurons, batch, tokens, head_dim)
    B, C = (t[:, :, groups].permute(2, 0, 1, 3) for t in (state.B, state.C))
    A = -torch.exp(weight(mixer, "A_log").detach()[heads].float())[:, None]  # (neurons, 1)
    y = head_scan(x, torch.stack([before, after]), A, B, C, tuple(mixer.time_step_limit))
    change = y[1] - y[0]  # (neurons, batch, tokens, head_dim)
    gate, gated = (t[:, :, heads].permute(2, 0, 1, 3) for t in (state.gate, state.gated))
    group_size = mixer.intermediate_size // mixer.n_groups
    variance = state.variance[..., groups].permute(2, 0, 1)
    new_variance = variance + ((2 * gated + gate * change) * gate * change).sum(-1) / group_size
    eps = mixer.norm.variance_epsilon
    scale, new_scale = torch.rsqrt(variance + eps), torch.rsqrt(new_variance + eps)
    norm_weight = weight(mixer.norm, "weight").detach().float().view(mixer.num_heads, -1)[heads][:, None, None]
    columns = weight(mixer.out_proj, "weight").detach().float().view(-1, mixer.num_heads, mixer.head_dim)[:, heads]
    head_term = torch.einsum("nbtp,hnp->nbth", norm_weight * gate * change * new_scale[..., None], columns)
    group_term = (new_scale / scale - 1)[..., None] * state.projected[:, groups].transpose(0, 1)
    hidden = state.output.float()[None] + group_term + head_term
    return hidden.to(state.output.dtype).flatten(0, 1)


def continued_block(block, hidden: Tensor, cache) -> Tensor:
    """The block on tokens that continue a context (batch x tokens x hidden), from the states the
    context left in transformers' cache (spent): the chunked scan starts from the cached SSM state
    and the conv from the cached inputs. At least two tokens go in, so that it is that scan and not
    the one-token cached step, which ignores `time_step_limit`; the extra token is causal padding."""
    tokens = hidden.shape[1]
    if tokens == 1:
        hidden = torch.cat([hidden, hidden], dim=1)
    return block(hidden, cache=cache)[:, :tokens]
