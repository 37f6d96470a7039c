"""The CogVideoX transformer (2b, 5b, 5b-I2V, 1.5-5b, 1.5-5b-I2V), on a joint [text; video] sequence.

Parameter names equal diffusers' ``CogVideoXTransformer3DModel`` so a ``transformer/`` folder
loads with no conversion. Unlike diffusers, text and video tokens stay in one tensor
[B, Nt + Nv, D] through every block (the same function with fewer copies); the text or video
modulation is picked by row index. The two fusion boundaries, the adaptive LayerNorm and QK-norm +
RoPE + attention, are calls into ``cogvx.kernels`` whose plain-PyTorch bodies are the references.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cogvx.kernels import adaptive_layernorm, adaptive_layernorm_fp8, cpu_kernels_unavailable, gelu_quant_rows

from .attention import Attention
from .config import TransformerConfig
from .fp8_linear import attach_fp8_weight, fp8_linear
from .positions import Positions, sincos_embedding, video_grid

__all__ = ["CogVideoXTransformer", "build_transformer", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal timestep features [B, dim] (fp32) of timesteps t [B] (diffusers ``get_timestep_embedding``)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class PatchEmbed(nn.Module):
    """Video latents [B, F, C, H, W] and text [B, Nt, Dtext] -> joint tokens [B, Nt + Nv, D]."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, p = cfg.inner_dim, cfg.patch_size
        self.p, self.pt = p, cfg.patch_size_t
        if cfg.patch_size_t is None:
            self.proj = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p, bias=cfg.patch_bias)
        else:  # 1.5: a linear layer over (C, pt, p, p) patches, always with bias (as diffusers)
            self.proj = nn.Linear(cfg.in_channels * p * p * cfg.patch_size_t, d)
        self.text_proj = nn.Linear(cfg.text_embed_dim, d)
        if cfg.use_learned_positional_embeddings:
            t, h, w = video_grid(cfg, cfg.sample_latent_frames, cfg.sample_height, cfg.sample_width)
            # diffusers' initial value (what a checkpoint overwrites): zeros for the text rows, the 3D sin-cos
            # table for the video rows; a module built from a config alone then holds no uninitialized memory.
            pe = torch.zeros(1, cfg.max_text_seq_length + t * h * w, d)
            pe[0, cfg.max_text_seq_length:] = sincos_embedding(cfg, (t, h, w))
            self.register_buffer("pos_embedding", pe)
        else:
            self.pos_embedding = None

    def forward(self, text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        b, f, c, h, w = video.shape
        p = self.p
        if self.pt is None:
            v = self.proj(video.reshape(b * f, c, h, w))  # [B*F, D, h/p, w/p]
            v = v.flatten(2).transpose(1, 2).reshape(b, f * (h // p) * (w // p), -1)
        else:
            pt = self.pt
            v = video.permute(0, 1, 3, 4, 2).reshape(b, f // pt, pt, h // p, p, w // p, p, c)
            v = v.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(4, 7).flatten(1, 3)
            v = self.proj(v)
        return torch.cat([self.text_proj(text), v], dim=1)


class AdaLayerNormZero(nn.Module):
    """Holds the weights of diffusers' ``CogVideoXLayerNormZero``; the math is in ``cogvx.kernels.adaln``."""

    def __init__(self, cond_dim: int, dim: int, affine: bool, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def modulation(self, silu_temb: torch.Tensor):
        """[B, 2, D] (text, video) sets of shift, scale and gate from SiLU(temb) [B, Tdim]."""
        shift, scale, gate, e_shift, e_scale, e_gate = self.linear(silu_temb).chunk(6, dim=1)
        return (
            torch.stack([e_shift, shift], dim=1),
            torch.stack([e_scale, scale], dim=1),
            torch.stack([e_gate, gate], dim=1),
        )


class GELUProj(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """GELU-tanh MLP, 4D inner; ``net`` indices match diffusers' ``FeedForward``."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim), nn.Dropout(dropout)])
        # Both linears int8 (gemm / gemm_quantized / finish, as int8dq-cpu's): the up GEMM's output goes
        # through cogvx.kernels.gelu_quant_rows straight into the down GEMM (set_fused_gelu_quant).
        self.fused_gelu_quant = False

    def forward(self, x: torch.Tensor, x_scale: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [.., D]; with ``x_scale`` [.., 1], x is float8 quantized per row and feeds the up projection as is."""
        if self.fused_gelu_quant and x_scale is None:
            up, down, lead = self.net[0].proj, self.net[2], x.shape[:-1]
            acc, s = up.gemm(x.reshape(-1, up.in_features))
            q, qs = gelu_quant_rows(acc, s, up.bias)
            return down.finish(down.gemm_quantized(q), qs, x.dtype).reshape(*lead, down.out_features)
        if x_scale is not None:
            x = F.gelu(fp8_linear(self.net[0].proj, x, x_scale, out_dtype), approximate="tanh")
        for m in self.net[1:] if x_scale is not None else self.net:
            x = m(x)
        return x


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.inner_dim
        self.norm1 = AdaLayerNormZero(cfg.time_embed_dim, d, cfg.norm_elementwise_affine, cfg.norm_eps)
        self.attn1 = Attention(cfg)
        self.norm2 = AdaLayerNormZero(cfg.time_embed_dim, d, cfg.norm_elementwise_affine, cfg.norm_eps)
        self.ff = FeedForward(d, cfg.dropout)
        self.backend = "torch"
        self.fp8_activations = False  # adaLN output quantized per row in the kernel, fed to q/k/v and ff-up

    def forward(self, x: torch.Tensor, silu_temb: torch.Tensor, rope, n_text: int, exchange=None) -> torch.Tensor:
        shift1, scale1, gate1 = self.norm1.modulation(silu_temb)
        shift2, scale2, gate2 = self.norm2.modulation(silu_temb)
        n1, n2 = self.norm1.norm, self.norm2.norm
        if self.fp8_activations:
            return self._forward_fp8(x, rope, n_text, exchange, shift1, scale1, gate1, shift2, scale2, gate2)
        _, y = adaptive_layernorm(x, None, None, n1.weight, n1.bias, shift1, scale1, n_text, n1.eps,
                                  backend=self.backend)
        a = self.attn1(y, rope, n_text, exchange)
        x, y = adaptive_layernorm(x, a, gate1, n2.weight, n2.bias, shift2, scale2, n_text, n2.eps,
                                  backend=self.backend)
        f = self.ff(y)
        return self._ff_residual(x, f, gate2, n_text)

    @staticmethod
    def _ff_residual(x, f, gate2, n_text):
        # Gated residual of the feed-forward, text and video rows with their own gate.
        return torch.cat([x[:, :n_text] + gate2[:, 0:1] * f[:, :n_text], x[:, n_text:] + gate2[:, 1:2] * f[:, n_text:]],
                         dim=1)

    def _forward_fp8(self, x, rope, n_text, exchange, shift1, scale1, gate1, shift2, scale2, gate2):
        """The block with both adaLN outputs leaving the kernel as fp8 + row scales (fp8dq-row)."""
        n1, n2 = self.norm1.norm, self.norm2.norm
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, scale1.dtype), shift1.dtype)
        _, y8, ys = adaptive_layernorm_fp8(x, None, None, n1.weight, n1.bias, shift1, scale1, n_text, n1.eps,
                                           backend=self.backend)
        a = self.attn1(y8, rope, n_text, exchange, x_scale=ys, out_dtype=out_dtype)
        x, y8, ys = adaptive_layernorm_fp8(x, a, gate1, n2.weight, n2.bias, shift2, scale2, n_text, n2.eps,
                                           backend=self.backend)
        return self._ff_residual(x, self.ff(y8, ys, out_dtype), gate2, n_text)


class OutputNorm(nn.Module):
    """diffusers ``AdaLayerNorm(chunk_dim=1)``: LN(x) * (1 + scale) + shift, (shift, scale) from temb."""

    def __init__(self, cond_dim: int, dim: int, affine: bool, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps, affine)

    def forward(self, x: torch.Tensor, silu_temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(silu_temb).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class CogVideoXTransformer(nn.Module):
    """Denoiser. ``forward(latents [B, F, C, H, W], text [B, Nt, Dtext], timestep [B], positions)``
    returns the v-prediction [B, F, C_out, H, W] in the model dtype."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        d = cfg.inner_dim
        self.patch_embed = PatchEmbed(cfg)
        self.time_embedding = TimestepMLP(d, cfg.time_embed_dim)
        self.ofs_embedding = TimestepMLP(cfg.ofs_embed_dim, cfg.ofs_embed_dim) if cfg.ofs_embed_dim else None
        self.transformer_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm_final = nn.LayerNorm(d, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.norm_out = OutputNorm(cfg.time_embed_dim, d, cfg.norm_elementwise_affine, cfg.norm_eps)
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        self.proj_out = nn.Linear(d, p * p * pt * cfg.out_channels_)

    # -- options applied after loading -------------------------------------------------
    def fuse_qkv(self, cat=torch.cat) -> None:
        for blk in self.transformer_blocks:
            blk.attn1.fuse_qkv(cat)

    def set_kernel_backend(self, backend: str, attention: str = "sdpa") -> None:
        """backend: "torch" (PyTorch references) or "triton" (fused kernels) for the adaptive LayerNorm
        and QK-norm + RoPE; attention: "sdpa" or "flash" (the Triton attention with RoPE on its tiles)."""
        if backend not in ("torch", "triton") or attention not in ("sdpa", "flash"):
            raise ValueError(f"backend must be 'torch' or 'triton' and attention 'sdpa' or 'flash' "
                             f"(got {backend!r}, {attention!r})")
        for blk in self.transformer_blocks:
            blk.backend = backend
            blk.attn1.backend = backend
            blk.attn1.attention = attention

    def set_attention_dtype(self, dtype: torch.dtype | None) -> None:
        """Run SDPA in ``dtype`` (None: the activations' dtype); q, k, v are cast after the QK norm and
        RoPE, the output cast back before the output projection."""
        for blk in self.transformer_blocks:
            blk.attn1.sdpa_dtype = dtype

    def set_fused_gelu_quant(self, on: bool = True) -> int:
        """Fuse the feed-forward's GELU with the quantization of the down projection's input
        (``cogvx.kernels.gelu_quant_rows``) in the blocks whose two feed-forward linears are int8 with
        ``gemm``, ``gemm_quantized`` and ``finish`` (int8dq-cpu's; a module filter may leave some in full
        precision), on a CPU that runs the kernel (elsewhere the unfused ops are the same numbers).
        Returns how many blocks fuse."""
        n, on = 0, on and not cpu_kernels_unavailable(kernel="gelu_quant")
        for blk in self.transformer_blocks:
            up, down = blk.ff.net[0].proj, blk.ff.net[2]
            blk.ff.fused_gelu_quant = on and all(hasattr(m, a) for m, a in
                                                 ((up, "gemm"), (down, "gemm_quantized"), (down, "finish")))
            n += blk.ff.fused_gelu_quant
        return n

    @staticmethod
    def fused_gelu_quant_missing() -> str:
        """Why this machine cannot run the fused GELU + quantization kernel ("" when it can)."""
        return cpu_kernels_unavailable(kernel="gelu_quant")

    def set_int8_cpu_attention(self, on: bool = True) -> str:
        """Attend on the CPU with ``cogvx.kernels.int8_attention`` (int8 q k^T, bf16 v; AVX-512 VNNI, with
        or without BF16; head dimension 64, or 16 / 32 in small test models); other devices keep SDPA. Returns why it cannot run on this machine
        ("" when it can); attention then stays as it was."""
        why = cpu_kernels_unavailable(self.config.attention_head_dim) if on else ""
        for blk in self.transformer_blocks:
            blk.attn1.int8_cpu = on and not why
        return why

    def set_int8_gpu_attention(self, on: bool = True) -> None:
        """Attend with ``cogvx.kernels.sage_attention`` (k smoothed, q and k int8 per token, int8 q k^T,
        fp16 p v): with the "triton" kernel backend its Triton kernels on CUDA (sm_80+) and under
        TRITON_INTERPRET=1, elsewhere (and with "torch") its PyTorch reference of the same numerics.
        Survives ``set_kernel_backend`` (a recipe's choice)."""
        for blk in self.transformer_blocks:
            blk.attn1.int8_gpu = on

    def set_fp8_activations(self, on: bool = True) -> None:
        """Feed the adaptive LayerNorm's per-row fp8 output straight into the q/k/v and feed-forward-up
        projections (their weights must be per-row float8: the fp8dq-row recipe); False: the plain path."""
        for blk in self.transformer_blocks:
            if on:
                attn = blk.attn1
                for layer in [attn.to_qkv] if attn.to_qkv is not None else [attn.to_q, attn.to_k, attn.to_v]:
                    attach_fp8_weight(layer)
                attach_fp8_weight(blk.ff.net[0].proj)
            blk.fp8_activations = on

    # -- forward -------------------------------------------------------------------------
    # Three regions, callable (and compilable) on their own: ``embed`` (patches, text, positions, time
    # embedding), ``blocks`` (any contiguous range of transformer blocks), ``head`` (output norm,
    # projection, unpatchify). ``forward`` is the three in a row.
    def forward(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        timestep: torch.Tensor,
        positions: Positions,
        ofs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, silu_temb = self.embed(latents, text, timestep, positions, ofs)
        x = self.blocks(x, silu_temb, positions, text.shape[1])
        return self.head(x, silu_temb, text.shape[1], latents.shape)

    def embed(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor, positions: Positions,
              ofs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(joint tokens [B, Nt + Nv, D] with positions added, SiLU(time embedding) [B, time_embed_dim])."""
        _, f, _, h, w = latents.shape
        temb = self.time_embed(timestep, ofs, latents.dtype)
        x = self.patch_embed(text, latents)
        return self._add_positions(x, positions, text.shape[1], f, h, w), F.silu(temb)

    def time_embed(self, timestep: torch.Tensor, ofs: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The time (+ ofs) embedding [B, time_embed_dim] before its SiLU, in ``dtype``: what every block's
        modulation is computed from (and TeaCache's step-change indicator)."""
        cfg = self.config
        temb = self.time_embedding(timestep_embedding(timestep, cfg.inner_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype))
        if self.ofs_embedding is not None:
            if ofs is None:
                raise ValueError("this model has an ofs embedding (CogVideoX1.5 I2V): pass ofs (the pipeline uses 2.0)")
            temb = temb + self.ofs_embedding(
                timestep_embedding(ofs, cfg.ofs_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype))
        return temb

    def blocks(self, x: torch.Tensor, silu_temb: torch.Tensor, positions: Positions, n_text: int,
               start: int = 0, stop: int | None = None, exchange=None) -> torch.Tensor:
        """Transformer blocks ``start .. stop - 1`` (all by default) on joint tokens [B, S, D].
        exchange: sequence parallelism (x is [text; a shard of the video]), see ``Attention.forward``."""
        for blk in self.transformer_blocks[start:stop]:
            x = blk(x, silu_temb, positions.rope, n_text, exchange)
        return x

    def head(self, x: torch.Tensor, silu_temb: torch.Tensor, n_text: int, latent_shape, gather=None) -> torch.Tensor:
        """Output norm and projection of the video tokens, unpatchified to [B, F, C_out, H, W].
        gather: under parallelism, maps this rank's projected tokens to every rank's [B', Nv, P]."""
        _, f, _, h, w = latent_shape
        v = self.proj_out(self.norm_out(self.norm_final(x[:, n_text:]), silu_temb))
        if gather is not None:
            v = gather(v)
        return self._unpatchify(v, v.shape[0], f, h, w)

    def _add_positions(self, x, positions: Positions, n_text: int, f: int, h: int, w: int) -> torch.Tensor:
        cfg = self.config
        if cfg.use_learned_positional_embeddings:
            if (h, w) != (cfg.sample_height, cfg.sample_width):
                raise ValueError(
                    f"this checkpoint has learned positional embeddings for latents of {cfg.sample_height}x"
                    f"{cfg.sample_width} (pixels {cfg.sample_height * 8}x{cfg.sample_width * 8}); got {h}x{w}"
                )
            if (f - 1) * cfg.temporal_compression_ratio + 1 == cfg.sample_frames:
                # Learned table covers text rows too: add it to the whole joint sequence.
                return x + self.patch_embed.pos_embedding.to(x.dtype)
            # As diffusers: other frame counts fall back to sin-cos positions on the video rows.
            pe = sincos_embedding(cfg, video_grid(cfg, f, h, w)).to(x.device)
        else:
            pe = positions.pos_embedding
        if pe is None:
            return x
        return torch.cat([x[:, :n_text], x[:, n_text:] + pe.to(x.dtype)], dim=1)

    def _unpatchify(self, v: torch.Tensor, b: int, f: int, h: int, w: int) -> torch.Tensor:
        p, pt = self.config.patch_size, self.config.patch_size_t
        if pt is None:
            out = v.reshape(b, f, h // p, w // p, -1, p, p)
            return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        out = v.reshape(b, (f + pt - 1) // pt, h // p, w // p, -1, pt, p, p)
        return out.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)


def build_transformer(cfg: TransformerConfig, device="meta", dtype: torch.dtype | None = None) -> CogVideoXTransformer:
    """An uninitialized transformer on ``device`` (meta: no memory), eval mode, no gradients."""
    with torch.device(device):
        model = CogVideoXTransformer(cfg)
    if dtype is not None and device != "meta":
        model = model.to(dtype)
    return model.eval().requires_grad_(False)
