"""A Mamba-1 block (mamba, falcon_mamba) written out once, for the fast engine, attribution and
continuation: the residual stream entering layer L, the pieces its mixer scans, the selective scan
itself (from a zero or a cached initial state), the block's output, and the blocks after it. Each
piece is computed as transformers' reference (non-CUDA) path computes it, on the block's device, with
its weights as its forward sees them (`placement`: offloaded ones loaded from the CPU or disk)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..intervention import with_bias
from .placement import weight
from .sites import decoder_layers


@dataclass
class LayerState:
    """Block L on one right-padded example batch, kept while the batch's neurons are swept.
    Channel-first like transformers' mixer: (batch, channels, tokens)."""

    output: Tensor  # the residual stream after block L, from the real block (batch x tokens x hidden)
    x: Tensor  # post-conv activations u (batch x channels x tokens), model dtype
    gate: Tensor  # z (batch x channels x tokens), model dtype
    dt_lin: Tensor  # W_dt t without the bias (batch x channels x tokens), model dtype
    B: Tensor  # batch x tokens x state
    C: Tensor  # batch x tokens x state

    def rows(self, members: list[int]) -> "LayerState":
        """The state of some sequences of the batch."""
        return LayerState(*(t[members] for t in (self.output, self.x, self.gate, self.dt_lin, self.B, self.C)))


def block_input(model, ids: Tensor, layer: int) -> Tensor:
    """The residual stream entering block `layer`: embeddings and blocks 0..layer-1."""
    return blocks(model, model.backbone.embeddings(ids), 0, layer)


def blocks(model, hidden: Tensor, start: int, stop: int) -> Tensor:
    """The residual stream entering block `stop` from the one entering block `start`."""
    for block in decoder_layers(model)[start:stop]:
        hidden = block(hidden)
    return hidden


def mixer_pieces(block, hidden: Tensor, window: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x, gate, W_dt t, B and C of a block's mixer (the block's norm, in_proj, causal depthwise conv +
    SiLU, x_proj, falcon_mamba's weightless RMS norms of t, B and C, `dt_proj.weight @ t`).
    `window`: the conv inputs of the tokens before these (batch x channels x kernel), as transformers'
    cache keeps them; without it the sequence starts here."""
    mixer = block.mixer
    normed = block.norm(hidden.to(dtype=block.norm.weight.dtype))
    tokens = normed.shape[1]
    x, gate = mixer.in_proj(normed).transpose(1, 2).chunk(2, dim=1)
    x = x.to(mixer.conv1d.weight.dtype)
    start = 0 if window is None else window.shape[-1]
    if window is not None:
        x = torch.cat([window.to(x.dtype), x], dim=-1)
    x = mixer.act(mixer.conv1d(x)[..., start: start + tokens]).to(gate.dtype)
    time_step, B, C = torch.split(mixer.x_proj(x.transpose(1, 2)),
                                  [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
    if hasattr(mixer, "dt_layernorm"):  # falcon_mamba
        time_step, B, C = mixer.dt_layernorm(time_step), mixer.b_layernorm(B), mixer.c_layernorm(C)
    dt_lin = weight(mixer.dt_proj, "weight") @ time_step.transpose(1, 2)
    return x, gate, dt_lin, B, C


@torch.no_grad()
def layer_state(model, hidden: Tensor, layer: int) -> LayerState:
    """Block L on the residual stream entering it (`block_input`): its real output and the pieces
    its mixer scans."""
    block = decoder_layers(model)[layer]
    return LayerState(block(hidden), *mixer_pieces(block, hidden))


def gated_scan(x: Tensor, dt_pre: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, gate: Tensor,
               initial: Tensor | None = None) -> Tensor:
    """Mamba's selective scan with its D skip and SiLU gate, for any leading dimensions, in float32 as
    transformers' reference `mamba_selective_scan` computes it, from a zero state or from `initial`
    (..., state), the state a cached context ended in.

    x, dt_pre, gate: (..., tokens); A: (..., state); D: (...); B, C: (..., tokens, state), broadcast.
    Returns the gated output y, float32 (..., tokens). The recurrence is a loop over tokens, as in
    transformers; each step touches only (..., state) and is read out at once, so the states over
    tokens are never stored.
    A cumulative-sum form, exp(A * (S_t - S_s)) with S the running sum of Delta, would avoid the loop
    but loses about |A| * S * 2^-24 of relative precision (1e-4 for |A| = 16, S = 100): not exact."""
    dt = F.softplus(dt_pre).float()
    decay = torch.exp(A[..., None, :] * dt[..., None])  # (..., tokens, state)
    drive = dt[..., None] * B.float() * x.float()[..., None]
    # tokens first: contiguous steps; unbind, not indexing, so that a backward pass (attribution)
    # gathers the steps' gradients once instead of filling a full-size zero tensor per step
    decay, drive = decay.movedim(-2, 0).unbind(0), drive.movedim(-2, 0).unbind(0)
    C = C.float().movedim(-2, 0).unbind(0)
    state = torch.zeros_like(drive[0]) if initial is None else initial.float().expand_as(drive[0])
    ys = []
    for step_decay, step_drive, step_C in zip(decay, drive, C):
        state = step_decay * state + step_drive
        ys.append((state * step_C).sum(-1))
    y = torch.stack(ys, dim=-1)
    y = y + x.float() * D.float()[..., None]
    return y * F.silu(gate).float()


def block_output(block, hidden: Tensor, y: Tensor) -> Tensor:
    """The block's output from its input (the residual) and its mixer's gated scan output y
    (batch x channels x tokens): residual + out_proj(y), on the block's device."""
    hidden = hidden.to(y.device)
    residual = hidden.float() if block.residual_in_fp32 else hidden
    return residual + block.mixer.out_proj(y.transpose(1, 2).to(block.mixer.out_proj.weight.dtype))


def continued_block(block, hidden: Tensor, window: Tensor, state: Tensor) -> Tensor:
    """The block on tokens that continue a context, from the conv inputs (`window`) and SSM state
    (`state`, batch x channels x state) the context left in transformers' cache: the recurrence of
    the full-sequence scan, carried on (transformers' multi-token forward would restart it at zero)."""
    return written_out_block(block, hidden, window, state)[0]


def written_out_block(block, hidden: Tensor, window: Tensor | None = None, state: Tensor | None = None,
                      offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The block's output and its mixer's dt_pre, the mixer written out from its pieces: from a zero
    state, or continuing a context (`window`, `state`: see `continued_block`). `offset` (batch x
    channels x tokens) is added to dt_pre: attribution's leaf, whose gradient is dt_pre's."""
    mixer = block.mixer
    x, gate, dt_lin, B, C = mixer_pieces(block, hidden, window)
    dt_pre = with_bias(dt_lin, weight(mixer.dt_proj, "bias"), dim=1)
    if offset is not None:
        dt_pre = dt_pre + offset
    A = -torch.exp(weight(mixer, "A_log").detach().float())
    y = gated_scan(x, dt_pre, A, B[:, None], C[:, None], weight(mixer, "D").detach(), gate, state)
    return block_output(block, hidden, y), dt_pre.detach()


