"""diffusers' attention-reuse caches on cogvx's transformer, with diffusers' rules (``diffusers.hooks``):

- Pyramid Attention Broadcast (``PyramidAttentionBroadcastConfig``): inside ``spatial_attention_timestep_skip_range``
  each block's self-attention is computed on every ``spatial_attention_block_skip_range``-th call and its last
  output reused in between (the attention is not run then).
- FasterCache (``FasterCacheConfig``): the same blocks reuse ``out_t + (out_t - out_{t-1}) * weight`` of the last
  two computed outputs, and the denoiser skips the unconditional half of the CFG batch on calls inside
  ``unconditional_batch_timestep_skip_range`` (but every ``unconditional_batch_skip_range``-th), rebuilding it
  from the conditional output plus the last low- and high-frequency (2-D FFT) differences, each weighted.

A cogvx block has one joint (text + video) self-attention, which is the one diffusers' CogVideoX hooks attach
to (its ``attn1``); its output is the joint [B, S, D] tensor where diffusers returns the two parts, and every
rule is elementwise, so the numbers are diffusers'. The state is reset after every pipeline call, as
diffusers' ``reset_stateful_hooks``. The configs are read by their fields; diffusers is not needed to run this.
"""

from __future__ import annotations

import re

import torch

__all__ = ["AttentionReuse"]


class _State:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.cache, self.iteration, self.batch_size = None, 0, None
        self.low, self.high = None, None


def _split_low_high(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``_split_low_high_freq``: the centred 2-D spectrum of x [..., H, W], inside and outside a disc
    of radius min(H, W) // 5 (fftshift over every dimension, as there)."""
    shifted = torch.fft.fftshift(torch.fft.fft2(x))
    h, w = x.shape[-2:]
    y, xg = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    low = (((xg - w // 2) ** 2 + (y - h // 2) ** 2) <= (min(h, w) // 5) ** 2).to(x.device)
    return shifted * low, shifted * ~low


class AttentionReuse:
    """PAB or FasterCache installed on a cogvx transformer's block attentions (see the module docstring)."""

    def __init__(self, transformer, config):
        self.kind = "pab" if type(config).__name__ == "PyramidAttentionBroadcastConfig" else "faster"
        self.config = config
        if config.current_timestep_callback is None:
            raise ValueError(f"{type(config).__name__}.current_timestep_callback must be set (diffusers needs it too): "
                             "e.g. config.current_timestep_callback = lambda: pipe.current_timestep")
        self.skip = config.spatial_attention_block_skip_range
        self.range = config.spatial_attention_timestep_skip_range
        ids = list(config.spatial_attention_block_identifiers)
        if self.kind == "faster" and config.attention_weight_callback is None:
            config.attention_weight_callback = lambda _: 0.5  # diffusers' default
        self.transformer = transformer
        self.blocks = [] if self.skip is None else [
            i for i in range(len(transformer.transformer_blocks))
            if any(re.search(p, f"transformer_blocks.{i}.attn1") for p in ids)]
        self.states = {i: _State() for i in self.blocks}
        self.denoiser_state = _State()
        for i in self.blocks:
            attn = transformer.transformer_blocks[i].attn1
            attn.forward = self._wrapped(i, attn, attn.forward)  # an instance attribute: removed by remove()

    def _now(self) -> float:
        return float(self.config.current_timestep_callback())

    def _in(self, bounds) -> bool:
        return bounds[0] < self._now() < bounds[1]

    def _wrapped(self, i: int, attn, forward):
        def pab(*args, **kwargs):
            st = self.states[i]
            compute = st.cache is None or st.iteration == 0 or not self._in(self.range) or st.iteration % self.skip == 0
            out = forward(*args, **kwargs) if compute else st.cache
            st.cache, st.iteration = out, st.iteration + 1
            return out

        def faster(*args, **kwargs):
            st, distilled = self.states[i], self.config.is_guidance_distilled
            b = args[0].shape[0]
            st.batch_size = b if st.batch_size is None else st.batch_size
            skip = self._in(self.range) and not (st.iteration > 0 and st.iteration % self.skip == 0)
            skip = skip and (distilled or st.batch_size != b)
            if skip:
                t2, t1 = (c[b:] if c.shape[0] != b else c for c in st.cache)
                out = t1 + (t1 - t2) * self.config.attention_weight_callback(attn)
            else:
                out = forward(*args, **kwargs)
            keep = out.chunk(2)[1] if not distilled and out.shape[0] == st.batch_size else out
            st.cache = [keep, keep] if st.cache is None else [st.cache[-1], keep]
            st.iteration += 1
            return out

        return pab if self.kind == "pab" else faster

    def denoiser(self, model):
        """The transformer call with FasterCache's unconditional-branch skipping (PAB: ``model`` itself)."""
        if self.kind == "pab" or self.config.is_guidance_distilled:
            return model
        cfg, ds = self.config, self.denoiser_state

        def call(x, text, timestep, positions, ofs=None):
            skip = ds.iteration > 0 and self._in(cfg.unconditional_batch_timestep_skip_range) and \
                ds.iteration % cfg.unconditional_batch_skip_range != 0
            if skip:
                x, text, timestep = (a.chunk(2)[1] for a in (x, text, timestep))
            out = model(x, text, timestep, positions, ofs)
            b = out.shape[0]
            if skip:
                ds.low = ds.low * _weight(cfg.low_frequency_weight_callback, self.transformer, self._in,
                                          cfg.low_frequency_weight_update_timestep_range, cfg.alpha_low_frequency)
                ds.high = ds.high * _weight(cfg.high_frequency_weight_callback, self.transformer, self._in,
                                            cfg.high_frequency_weight_update_timestep_range, cfg.alpha_high_frequency)
                low, high = _split_low_high(out.flatten(0, 1).float())
                uncond = torch.fft.ifft2(torch.fft.ifftshift(ds.low + low + ds.high + high)).real
                out = torch.cat([uncond.unflatten(0, (b, -1)).to(out.dtype), out])
            else:
                u, c = (_split_low_high(h.flatten(0, 1).float()) for h in out.chunk(2))
                ds.low, ds.high = u[0] - c[0], u[1] - c[1]
            ds.iteration += 1
            return out

        return call

    def reset(self) -> None:
        for st in [*self.states.values(), self.denoiser_state]:
            st.reset()

    def remove(self) -> None:
        for i in self.blocks:
            self.transformer.transformer_blocks[i].attn1.__dict__.pop("forward", None)


def _weight(callback, module, within, bounds, alpha) -> float:
    """A frequency weight: the config's callback, or diffusers' default (alpha inside ``bounds``, else 1)."""
    if callback is not None:
        return callback(module)
    return alpha if within(bounds) else 1.0
