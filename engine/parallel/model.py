"""One rank's transformer forward under a parallel mode: same call as ``CogVideoXTransformer.forward``, and
the same result on every rank: the prediction for the whole CFG batch."""

from __future__ import annotations

import torch
from torch import nn

from ..models.positions import Positions
from ..models.transformer import CogVideoXTransformer
from .collectives import Call, Comm
from .groups import Mesh
from .sharding import Exchange, SeqLayout, forward_calls, gather_tokens, head_groups, shard_tokens

__all__ = ["ParallelTransformer"]


class ParallelTransformer(nn.Module):
    """Wraps the engine's transformer (its parameters, not a copy) for this rank of ``mesh``.

    forward(latents [B, F, C, H, W], text [B, Nt, Dtext], timestep [B], positions, ofs): under CFG
    parallelism latents and text are this rank's half of the guidance batch (B = the videos of the call);
    the result is [cfg * B, F, C_out, H, W], the prediction of every half ([uncond; cond]), on every rank.
    Under Ulysses the rank embeds the whole video (cheap: a patch projection), keeps the text rows and its
    video shard, runs every block on them with the all-to-alls around attention, and the projected tokens
    of all ranks meet in one all-gather per forward (the only collective of CFG parallelism).
    """

    def __init__(self, model: CogVideoXTransformer, mesh: Mesh, comm: Comm):
        super().__init__()
        self.model = model
        self.mesh = mesh
        self.comm = comm
        self.heads = tuple(head_groups(model.config.num_attention_heads, mesh.ulysses))

    @property
    def config(self):
        return self.model.config

    def layout(self, n_text: int, n_video: int) -> SeqLayout:
        return SeqLayout(n_text, n_video, self.mesh.ulysses, self.mesh.seq_rank)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor, positions: Positions,
                ofs: torch.Tensor | None = None) -> torch.Tensor:
        m, mesh = self.model, self.mesh
        x, silu_temb = m.embed(latents, text, timestep, positions, ofs)
        n_text = text.shape[1]
        lay = self.layout(n_text, x.shape[1] - n_text)
        exchange = None
        if lay.size > 1:
            x = shard_tokens(x, lay)
            exchange = Exchange(lay, self.heads, mesh.seq_group, self.comm)
        x = m.blocks(x, silu_temb, positions, n_text, exchange=exchange)
        return m.head(x, silu_temb, n_text, latents.shape,
                      gather=lambda v: gather_tokens(v, self.comm, mesh.world_group, mesh.cfg, lay))

    def calls(self, batch: int, n_text: int, n_video: int, dtype: torch.dtype) -> list[Call]:
        """The collectives of one forward of this shape (for ``Comm.replay``)."""
        cfg = self.model.config
        out_dim = self.model.proj_out.out_features
        return forward_calls(self.layout(n_text, n_video), self.heads, cfg.num_layers, batch,
                             cfg.attention_head_dim, out_dim, self.mesh.cfg, self.mesh.seq_group,
                             self.mesh.world_group, dtype)
