"""Ulysses sequence parallelism over the joint [text; video] sequence.

Each of the U ranks of a Ulysses group holds the text rows (replicated) and one shard of the video rows,
``chunk = ceil(Nv / U)`` rows, the last shard padded with zero rows, so any video-token count works:
its rows are ``[text; video shard]``, so "row < n_text" is still text on a shard (the fused kernels run
with row offset 0). Everything outside attention is row-local and runs on the shard. Around attention,
one all-to-all sends each rank's video rows of q, k, v for head group j to rank j; rank j then holds the
whole sequence (its own text rows, every rank's video rows, the padding dropped) for its heads, applies
QK-norm, RoPE with the whole table and attention exactly as one process would, and a second all-to-all
returns each rank its video rows (and the text rows) for every head. Head counts need not divide by U
(groups differ by at most one head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .collectives import Call, Comm

__all__ = ["SeqLayout", "head_groups", "Exchange", "shard_tokens", "gather_tokens", "forward_calls"]


def head_groups(heads: int, size: int) -> list[int]:
    """Heads per rank of a Ulysses group of ``size``: as even as possible, larger groups first."""
    return [heads // size + (j < heads % size) for j in range(size)]


@dataclass(frozen=True)
class SeqLayout:
    """Rows of one forward under Ulysses: n_text text rows on every rank, n_video video rows in ``size``
    shards of ``chunk`` rows (the last one padded); this rank holds shard ``rank``."""

    n_text: int
    n_video: int
    size: int
    rank: int

    @property
    def chunk(self) -> int:
        return -(-self.n_video // self.size)

    @property
    def rows(self) -> int:
        """Rows on each rank: text and one (padded) video shard."""
        return self.n_text + self.chunk

    @property
    def pad(self) -> int:
        """Zero rows after the last video row, to fill the last shard."""
        return self.size * self.chunk - self.n_video


def shard_tokens(x: torch.Tensor, lay: SeqLayout) -> torch.Tensor:
    """Joint tokens [B, Nt + Nv, D] -> this rank's [B, Nt + chunk, D]: the text rows and its video shard."""
    lo = lay.n_text + lay.rank * lay.chunk
    part = x[:, lo : lo + lay.chunk]
    if part.shape[1] < lay.chunk:
        part = torch.nn.functional.pad(part, (0, 0, 0, lay.chunk - part.shape[1]))
    return torch.cat([x[:, : lay.n_text], part], dim=1)


def gather_tokens(v: torch.Tensor, comm: Comm, group: str, cfg: int, lay: SeqLayout) -> torch.Tensor:
    """Every rank's projected video tokens, whole: v [B, chunk, P] on each of the cfg x U ranks of the world
    group -> [cfg * B, Nv, P] (CFG halves in rank order: [uncond; cond]), with one all-gather."""
    if cfg * lay.size == 1:
        return v
    b, n, p = v.shape
    every = comm.all_gather(v, group).view(cfg, lay.size, b, n, p)
    every = every.permute(0, 2, 1, 3, 4).reshape(cfg * b, lay.size * n, p)
    return every[:, : lay.n_video] if lay.pad else every


@dataclass(frozen=True)
class Exchange:
    """The two all-to-alls around attention for one forward (see the module docstring); an
    ``Attention.forward`` exchange."""

    lay: SeqLayout
    heads: tuple[int, ...]  # head_groups(H, U)
    group: str
    comm: Comm

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend) -> torch.Tensor:
        lay, heads = self.lay, self.heads
        b, rows, h_all, dh = q.shape
        nt, c, u = lay.n_text, lay.chunk, lay.size
        lo = sum(heads[: lay.rank])
        mine = heads[lay.rank]
        qkv = torch.stack([q, k, v], dim=2)  # [B, rows, 3, H, Dh]
        # Rows -> heads: video rows of head group j to rank j, laid out [rows, B, 3, h_j, Dh] so the pieces
        # received from ranks 0..U-1 stack into the whole video in row order.
        vid = qkv[:, nt:].permute(1, 0, 2, 3, 4)
        send, start = [], 0
        for n in heads:
            send.append(vid[:, :, :, start : start + n].reshape(-1))
            start += n
        piece = c * b * 3 * dh
        got = self.comm.all_to_all(torch.cat(send), [piece * mine] * u, [piece * n for n in heads], self.group)
        got = got.view(u * c, b, 3, mine, dh)[: lay.n_video].permute(1, 0, 2, 3, 4)
        full = torch.cat([qkv[:, :nt, :, lo : lo + mine], got], dim=1)  # [B, Nt + Nv, 3, h, Dh]
        o = attend(*full.unbind(2))  # [B, h, Nt + Nv, Dh]
        # Heads -> rows: to rank i the text rows and its video shard, [h, B, Nt + chunk, Dh]; the pieces
        # received stack into every head in order.
        o = o.transpose(0, 1)
        if lay.pad:
            o = torch.nn.functional.pad(o, (0, 0, 0, lay.pad))
        text = o[:, :, :nt]
        back = torch.stack([torch.cat([text, o[:, :, nt + i * c : nt + (i + 1) * c]], dim=2) for i in range(u)])
        piece = b * rows * dh
        out = self.comm.all_to_all(back.reshape(-1), [piece * n for n in heads], [piece * mine] * u, self.group)
        return out.view(h_all, b, rows, dh).transpose(0, 1)  # [B, H, rows, Dh]


def forward_calls(lay: SeqLayout, heads: tuple[int, ...], layers: int, batch: int, head_dim: int, out_dim: int,
                  cfg: int, seq_group: str | None, world_group: str, dtype: torch.dtype) -> list[Call]:
    """The collectives one parallel forward makes, in order, with their sizes (what ``Comm.replay`` runs
    to time a compiled forward): per block the two all-to-alls of ``Exchange``, then the all-gather of
    the predictions. batch: this rank's batch; out_dim: projected features per video token."""
    calls = []
    if lay.size > 1:
        mine = heads[lay.rank]
        piece = lay.chunk * batch * 3 * head_dim
        to_heads = Call("all_to_all", seq_group, piece * sum(heads), (piece * mine,) * lay.size,
                        tuple(piece * n for n in heads), dtype)
        piece = batch * lay.rows * head_dim
        to_rows = Call("all_to_all", seq_group, piece * mine * lay.size, tuple(piece * n for n in heads),
                       (piece * mine,) * lay.size, dtype)
        calls += [to_heads, to_rows] * layers
    if cfg * lay.size > 1:
        calls.append(Call("all_gather", world_group, batch * lay.chunk * out_dim, dtype=dtype))
    return calls
