"""What a generate call does differently on several processes (``cogvx.engine.parallel`` does the model
side): the ranks agree on the arguments before any heavy work, share a seed drawn at random, take their
CFG half, decode on rank 0 (or decode the VAE tiles across ranks), and report time per rank."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..io.checkpoint import resolve_model_dir
from ..parallel import (Comm, Mesh, ParallelTransformer, agree_or_raise, broadcast_int, checkpoint_digest, digests,
                        gather_floats, raise_together)
from ..parallel.decode import decode_tiles
from ..runtime.profiling import Profile
from .guidance import Guidance, SplitGuidance
from .request import Request

__all__ = ["Parallel", "STAGES"]

_INPUT_FILES = ("image", "video", "control_video")  # arguments that may name a file: compared by content

# The stages each rank reports (in this order) in ``profile.parallel["ranks"]``.
STAGES = ("prepare", "tokenize", "text_encode", "encode", "compile", "denoise", "vae_decode")


class Parallel:
    """An engine's parallel side: the rank grid, the collectives and the per-rank forward."""

    def __init__(self, mesh: Mesh, transformer):
        self.mesh = mesh
        self.comm = Comm(mesh.device, mesh.timeout)
        self.net = ParallelTransformer(transformer, mesh, self.comm)

    @property
    def rank(self) -> int:
        return self.mesh.rank

    @staticmethod
    def agree_load(args: dict, mesh: Mesh, model=None) -> Path | None:
        """Every rank raises the same ValueError when the ranks' load arguments differ (one all-gather).
        ``model``: a checkpoint, compared by the contents of its files (``checkpoint_digest``: ranks may
        reach it by different paths, and a copy with one changed weight differs); resolved here, and a
        rank that cannot read it raises only after the all-gather, so the other ranks are told instead of
        waiting. Returns its directory."""
        model_dir, error, ident = None, None, None
        if model is not None:
            try:
                model_dir = resolve_model_dir(model)
                ident = checkpoint_digest(model_dir)
            except (ValueError, TypeError, OSError) as e:
                error, ident = e, f"unreadable: {e}"
        agree_or_raise("Engine.load", digests(dict(args, model=ident)), mesh.device, mesh.group, mesh.timeout)
        if error is not None:
            raise error
        return model_dir

    def plan(self, checked, args: dict, req: Request):
        """``checked()`` (the argument checks of a generate call, returning (plan, ...)) on every rank, after
        the ranks agreed on ``args``; a check that fails on one rank (a file missing on its node, less free
        memory) raises on every rank. Then the parallel modes' own checks, and rank 0's seed on every rank
        when it was drawn at random."""
        m = self.mesh
        agree_or_raise("Engine.generate", digests(_with_files(args)), m.device, m.group, m.timeout)
        result, error = None, None
        try:
            result = checked()
        except (ValueError, TypeError, OSError) as e:
            error = e
        raise_together(error, "Engine.generate", m.device, group=m.group, timeout=m.timeout)
        plan = result[0]
        if self.mesh.cfg == 2 and not plan.cfg:
            raise ValueError(f"parallel={self.mesh.mode!r} runs the two halves of classifier-free guidance on "
                             f"different ranks, but guidance_scale={req.guidance_scale} turns guidance off; use "
                             "guidance_scale > 1, or load with parallel='ulysses'")
        if req.seed is None and req.generator is None and plan.seed is not None:
            plan.seed = broadcast_int(plan.seed, m.device, m.group, m.timeout)
        return result

    def local(self, text: torch.Tensor, guidance: Guidance) -> tuple[torch.Tensor, Guidance]:
        """This rank's text batch and guidance: under CFG parallelism its half of [uncond; cond]."""
        if self.mesh.cfg == 1:
            return text, guidance
        return text.chunk(2)[self.mesh.cfg_rank], SplitGuidance(guidance.enabled, guidance.scales)

    def decode(self, engine, latents: torch.Tensor) -> torch.Tensor | None:
        """The decoded video on rank 0 (None on the others): with VAE tiling on, the tiles are decoded
        across ranks and gathered on rank 0; else rank 0 decodes alone."""
        vae = engine.vae
        if vae is not None and vae.use_tiling and latents.ndim == 5:
            out = decode_tiles(vae, vae.decoder_input(latents), self.mesh)
            return None if out is None else out.to(engine.dtype)
        return engine.decode(latents) if self.rank == 0 else None

    def report_loop(self, prof: Profile, compiled: bool, steps: int) -> None:
        """This rank's collective time in the loop into ``prof.parallel``: measured where the collectives
        ran when eager; for a compiled forward, which cannot be timed inside, the same collectives replayed
        on their own, times the steps (every rank calls this)."""
        if compiled and steps:
            s = prof.shape
            calls = self.net.calls(s["batch"] // self.mesh.cfg, s["text_tokens"], s["video_tokens"], self._dtype(prof))
            per_step = self.comm.replay(calls)
            coll, how, ncalls = per_step * steps, "replayed", len(calls) * steps
            nbytes = sum(c.numel * c.dtype.itemsize for c in calls) * steps
        else:
            coll, how, ncalls, nbytes = self.comm.seconds, "measured", len(self.comm.calls), self.comm.bytes
        m = self.mesh
        prof.parallel = dict(mode=m.mode, world=m.world, rank=m.rank, cfg_degree=m.cfg, ulysses_degree=m.ulysses,
                             backend=m.backend, collective_seconds=coll, collective_timing=how,
                             collective_calls=ncalls, collective_bytes=nbytes)

    def report_ranks(self, prof: Profile, elapsed: float) -> None:
        """Every rank's stage times, median step and collective seconds into ``prof.parallel["ranks"]``
        (one all-gather; every rank calls this)."""
        mine = [prof.stages.get(s, math.nan) for s in STAGES]
        mine += [prof.step_median, prof.parallel.get("collective_seconds", math.nan), elapsed]
        ranks = []
        for r, row in enumerate(gather_floats(mine, self.mesh.device, self.mesh.group, self.mesh.timeout)):
            stages = {s: v for s, v in zip(STAGES, row) if not math.isnan(v)}
            ranks.append(dict(rank=r, stages=stages, step_median_seconds=row[-3], collective_seconds=row[-2],
                              seconds=row[-1]))
        prof.parallel["ranks"] = ranks

    @staticmethod
    def _dtype(prof: Profile) -> torch.dtype:
        return getattr(torch, prof.dtype)


def _with_files(args: dict) -> dict:
    """args with the inputs given as file paths replaced by the files' bytes (ranks on different nodes may
    hold different files under one path; a missing file reads as missing)."""
    out = dict(args)
    for k in _INPUT_FILES:
        v = args.get(k)
        if isinstance(v, (str, os.PathLike)):
            p = Path(v).expanduser()
            out[k] = p.read_bytes() if p.is_file() else f"missing file {os.fspath(v)}"
    return out
