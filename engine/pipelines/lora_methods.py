"""The LoRA methods of :class:`~cogvx.engine.Engine` (diffusers' names), kept apart from the engine's
orchestration: each takes the engine's lock, changes the adapters (``cogvx.engine.pipelines.lora``) and
has the forward's owner rebuild what holds the weights it saw (``Forward.weights_changed``)."""

from __future__ import annotations

import os

__all__ = ["LoraMethods"]


class LoraMethods:
    """Mixed into Engine; uses its ``lora``, ``transformer``, ``dtype``, ``lock`` and ``forward``."""

    def load_lora(self, path: str | os.PathLike, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Load a diffusers/peft CogVideoX LoRA (a .safetensors file or its directory) as an active adapter
        with weight ``scale``; returns its name. Runs as a side branch until :meth:`fuse_lora`."""
        with self.lock, self.residency.use("transformer"):
            name = self.lora.load(self.transformer, path, adapter_name, scale, dtype=self.dtype)
            self.forward.weights_changed()
        return name

    def set_adapters(self, adapter_names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Activate these adapters (others off) with these weights (default 1.0 each)."""
        with self.lock, self.residency.use("transformer"):
            self.lora.set_adapters(self.transformer, adapter_names, weights, dtype=self.dtype)
            self.forward.weights_changed()

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """Merge the active adapters (times ``lora_scale``) into the transformer weights."""
        with self.lock, self.residency.use("transformer"):
            self.lora.fuse(self.transformer, lora_scale, adapter_names, dtype=self.dtype)
            self.forward.weights_changed()

    def unfuse_lora(self) -> None:
        """Take fused adapters out of the weights again; they run as side branches."""
        with self.lock, self.residency.use("transformer"):
            self.lora.unfuse(self.transformer, dtype=self.dtype)
            self.forward.weights_changed()

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        with self.lock, self.residency.use("transformer"):
            self.lora.delete(self.transformer, adapter_names, dtype=self.dtype)
            self.forward.weights_changed()
