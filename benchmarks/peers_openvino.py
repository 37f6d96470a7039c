"""OpenVINO peer rows for the sweep: diffusers' CogVideoXTransformer3DModel on the same weights, converted
with ``openvino.convert_model`` (once per sweep, shared by the rows) and compiled for the CPU:

- ``openvino-fp32``: ``INFERENCE_PRECISION_HINT`` f32 (on a CPU with AMX or AVX-512 BF16 OpenVINO would
  otherwise run the graph in bf16);
- ``openvino-bf16``: its default on such a CPU (bf16 compute, AMX tiles where the CPU has them);
- ``openvino-int8``: NNCF ``quantize`` (transformer preset, ``CALIBRATION`` calibration inputs, the layers
  cogvx's default filter keeps -- time embedding, norm_out, proj_out -- left unquantized), the rest in f32;
- ``openvino-int8-bf16``: the same int8 model with the rest in OpenVINO's default precision (bf16 here).

Needs the optional ``bench`` extra (openvino, nncf). Conversion traps (DESIGN.md section 7): at a video
size other than the config's, diffusers' sin-cos patch embedding rewrites its table through ``.data``,
which tracing does not record: the table is computed for the benchmark's size first and sample_height /
width / frames set to it. The converted model is cloned before NNCF touches it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from peers import Row, diffusers_transformer

OPENVINO_PEERS = ("openvino-fp32", "openvino-bf16", "openvino-int8", "openvino-int8-bf16")
CALIBRATION = 4
KEPT_FP32 = (".*time_embedding.*", ".*norm_out.*", ".*proj_out.*")  # cogvx's default transformer filter


class _Step(nn.Module):
    """diffusers' transformer as one function of three tensors (what convert_model traces)."""

    def __init__(self, transformer, rope):
        super().__init__()
        self.transformer, self.rope = transformer, rope  # rope: (cos, sin) or None, constants of the graph

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                timestep=timestep, image_rotary_emb=self.rope, return_dict=False)[0]


def _fix_positional_table(ref, latents: torch.Tensor) -> None:
    """Give diffusers' patch embedding the sin-cos table of this latent size, so that its forward does not
    rebuild it (through ``.data``, which the trace would miss)."""
    pe = ref.patch_embed
    if not getattr(pe, "use_positional_embeddings", False):
        return
    f_lat, h, w = latents.shape[1], latents.shape[-2], latents.shape[-1]
    frames = (f_lat - 1) * pe.temporal_compression_ratio + 1
    pe.sample_height, pe.sample_width, pe.sample_frames = h, w, frames
    pe.pos_embedding = pe._get_positional_embeddings(h, w, frames).to(latents.device)


_CONVERTED: dict = {}


def convert(model, inputs):
    """The OpenVINO model of diffusers' transformer on ``model``'s weights at ``inputs``' shapes (converted
    once per model and input; callers clone it before changing it)."""
    import openvino as ov

    lat, text, t, pos = inputs
    key = (id(model), tuple(lat.shape), tuple(text.shape))
    if key not in _CONVERTED:
        ref = diffusers_transformer(model, torch.float32)
        _fix_positional_table(ref, lat)
        with torch.no_grad():
            _CONVERTED[key] = ov.convert_model(_Step(ref, pos.rope).eval(), example_input=(lat, text, t))
        del ref
    return _CONVERTED[key]


_QUANTIZED: dict = {}


def _int8(ov_model, inputs):
    """NNCF's int8 model of ``ov_model`` (once per converted model)."""
    import nncf

    if id(ov_model) not in _QUANTIZED:
        _QUANTIZED[id(ov_model)] = nncf.quantize(
            ov_model.clone(), nncf.Dataset(_calibration(inputs, CALIBRATION)), model_type=nncf.ModelType.TRANSFORMER,
            subset_size=CALIBRATION, ignored_scope=nncf.IgnoredScope(patterns=list(KEPT_FP32), validate=False))
    return _QUANTIZED[id(ov_model)]


def _calibration(inputs, n: int) -> list[tuple]:
    """``n`` inputs shaped as the benchmark's: fresh latents and text, timesteps spread over the schedule."""
    lat, text, t, _ = inputs
    g = torch.Generator().manual_seed(1234)
    out = []
    for i in range(n):
        out.append((torch.randn(lat.shape, generator=g), torch.randn(text.shape, generator=g),
                    torch.full_like(t, int(999 * (i + 0.5) / n))))
    return [tuple(x.numpy() for x in c) for c in out]


def openvino_step(model, peer: str, inputs, threads: int) -> Row:
    """An OpenVINO row: one of ``OPENVINO_PEERS`` (see the module docstring)."""
    import openvino as ov

    if peer not in OPENVINO_PEERS:
        raise ValueError(f"{peer!r} is not one of {', '.join(OPENVINO_PEERS)}")
    t0 = time.perf_counter()
    ov_model = convert(model, inputs)
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if peer in ("openvino-fp32", "openvino-int8"):
        config["INFERENCE_PRECISION_HINT"] = "f32"
    if peer.startswith("openvino-int8"):
        ov_model = _int8(ov_model, inputs)
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    feed = [x.numpy() for x in inputs[:3]]
    prepare_s = time.perf_counter() - t0

    def step():
        request.infer(feed)
        return torch.from_numpy(request.get_output_tensor(0).data.copy()).float()

    runs = str(compiled.get_property("INFERENCE_PRECISION_HINT")).removeprefix("<Type: '").removesuffix("'>")
    return Row(peer, "openvino", "nncf int8" if "int8" in peer else "none", f"float32 in, {runs} compute",
               True, "step", step, {"prepare_s": prepare_s})
