"""Offloading of one engine (``Engine.load(offload=...)``, ``engine.enable_offload(mode)``): the mode
maps onto the placements of the engine's :class:`~cogvx.engine.runtime.residency.Residency`.

    on CUDA    "model"       each component on the offload device (CPU), moved whole to the GPU for its stage
               "group"       the transformer's blocks streamed in groups (next group prefetched on a side
                             stream from pinned memory); T5 and the VAE as "model"
               "sequential"  T5 and the transformer one block at a time (no overlap), the VAE as "model":
                             the smallest footprint, the slowest
    on a CPU   any mode      every full-precision component read from the checkpoint's safetensors for its
                             stage and released after: peak memory about the largest stage, not the sum

What stays in memory on a CPU, and why: a quantized component (by a recipe at load, or a quantized
checkpoint) is kept: re-quantizing per stage would repeat the quantization (and a calibrated recipe's T5
pass) every stage, while the quantized weights are 2-8x smaller than the fp32 ones they replace. A
transformer with a LoRA fused into its weights is kept while it is fused (the checkpoint no longer holds
its weights); LoRA side branches are kept across releases (they are small and not in the checkpoint). A
transformer compiled by inductor on the CPU is kept: inductor's freezing folds the weights into the graph,
which holds them anyway.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import torch

from ..loading import DEFERRABLE, reloader
from ..models.lora import branch_of
from ..runtime.group_offload import BlockStreamer, block_units
from ..runtime.residency import OFFLOAD_MODES, Materialized, Moved, Residency, Resident, Streamed

__all__ = ["OffloadMethods", "check_offload", "offload_plan"]


def check_offload(mode, device: torch.device, *, parallel=None, compile=False, offload_device=None) -> None:
    """Refuse what does not combine, before anything is loaded."""
    if mode is not None and mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be None, 'model', 'group' or 'sequential' (got {mode!r})")
    if mode is None:
        return
    if parallel is not None:
        raise ValueError("offload does not combine with parallel=...: each rank holds the whole model on its own "
                         "device; use one or the other")
    if mode in ("group", "sequential") and compile and device.type == "cuda":
        raise ValueError(f"offload={mode!r} streams weights from hooks that a compiled graph cannot trace; use "
                         "offload='model' with compile (its moves keep the compiled graph), or compile=False")
    if offload_device is not None and torch.device(offload_device).type != "cpu":
        raise ValueError(f"offload_device must be the CPU (got {offload_device!r}): components wait in host memory")


def offload_plan(mode, device: torch.device, *, parallel=None, compile=False) -> dict:
    """``load_components``' arguments for an offload mode (checked first): where the weights load
    (``load_device``) and which components stay unread until their stage (``defer``)."""
    check_offload(mode, device, parallel=parallel, compile=compile)
    if mode is None:
        return dict(load_device=device, defer=())
    if device.type == "cpu":
        return dict(load_device=device, defer=DEFERRABLE)
    return dict(load_device=torch.device("cpu"), defer=())


class OffloadMethods:
    """Mixed into Engine; uses its ``residency``, components, ``device``, ``model_dir``, ``recipes``,
    ``lora`` and compile state."""

    @cached_property
    def residency(self) -> Residency:
        """Where each component lives and when it moves; the pipelines ask it for a component."""
        return Residency(lambda name: getattr(self, name, None))

    def enable_offload(self, mode: str | None, device: str | torch.device | None = None, *, group_size: int = 1,
                       use_stream: bool = True) -> None:
        """Where each component lives between its stages (see ``cogvx.engine.pipelines.offload``).

        mode: None (every component resident on ``engine.device``), "model", "group" or "sequential".
        device: the offload device, the CPU (default). group_size / use_stream: "group" on CUDA: blocks per
        group, and whether the next group's copy overlaps the current group's compute on a side stream.
        On a CPU every mode reads full-precision components from the checkpoint per stage (the engine must
        have been loaded from a checkpoint directory). ``engine.residency.events`` records every move.
        """
        check_offload(mode, self.device, parallel=self.parallel, compile=self.forward.compiled is not None,
                      offload_device=device)
        with self.lock:
            if mode is None:
                plan = {n: Resident() for n in DEFERRABLE}
            elif self.device.type == "cpu":
                plan = self._cpu_placements(mode)
            else:
                plan = self._cuda_placements(mode, group_size, use_stream)
            for name, placement in plan.items():
                self.residency.place(name, placement)
            self.residency.mode = mode

    # ------------------------------------------------------------------ placements
    def _cuda_placements(self, mode: str, group_size: int, use_stream: bool) -> dict:
        dev, cpu = self.device, torch.device("cpu")
        if mode == "model":
            return {n: Moved(dev, cpu) for n in DEFERRABLE}
        if mode == "group":
            blocks = BlockStreamer(lambda m: block_units(m.transformer_blocks, group_size), dev, use_stream=use_stream)
            return {"text_encoder": Moved(dev, cpu), "transformer": Streamed(blocks), "vae": Moved(dev, cpu)}
        # sequential: T5 and the transformer one block at a time, no overlap; the VAE whole (its convolutions
        # read their weights in functional calls: see runtime/group_offload.py)
        t5 = BlockStreamer(lambda m: block_units(m.encoder.block, 1), dev, use_stream=False)
        blocks = BlockStreamer(lambda m: block_units(m.transformer_blocks, 1), dev, use_stream=False)
        return {"text_encoder": Streamed(t5), "transformer": Streamed(blocks), "vae": Moved(dev, cpu)}

    def _cpu_placements(self, mode: str) -> dict:
        if mode != "model":
            warnings.warn(f"offload={mode!r} on a CPU: there is no accelerator to stream blocks to; each component is "
                          "read from the checkpoint for its stage and released after (as offload='model')",
                          UserWarning, stacklevel=4)
        if self.model_dir is None:
            raise ValueError("offload on a CPU reads each component from its checkpoint for its stage, and this "
                             "engine was not loaded from a checkpoint directory (Engine.load(DIR)); load it from one")
        plan = {}
        for name in DEFERRABLE:
            if name in self.recipes:
                plan[name] = Resident()  # quantized: kept (see the module docstring)
            else:
                load = reloader(name, self.model_dir / name, self.device)
                plan[name] = Materialized(load, self._transformer_kept, self._transformer_back) \
                    if name == "transformer" else Materialized(load)
        return plan

    def _transformer_back(self, transformer) -> None:
        # A side branch attached while the weights were released was made on the meta device: make it again.
        if any(b.is_meta for m in transformer.modules() if (br := branch_of(m)) is not None for b in br.buffers()):
            self.lora.apply(transformer, self.dtype)

    def _transformer_kept(self) -> str | None:
        """Why the transformer's weights cannot be released now, or None."""
        if self.lora.fused:
            return "a LoRA is fused into its weights"
        if self.forward.compiled is not None and self.forward.compile_backend == "inductor":
            why = "compiled by inductor on the CPU, whose freezing folds the weights into the graph"
            warnings.warn(f"offload on a CPU keeps the transformer in memory: it is {why}; without compile it is "
                          "read per stage", UserWarning, stacklevel=2)
            return why
        return None
