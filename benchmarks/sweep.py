"""One denoising step of cogvx per recipe against its peers, timed alternately in one process, and
(``--e2e``) whole generations: text encoding + denoising steps + VAE decode.

Rows: cogvx's transformer per ``--recipes`` (compiled, q/k/v fused unless --no-fuse-qkv) and the
``--peers``: diffusers' transformer on the same weights compiled in fp32, in bf16, and with torchao's
``Int8DynamicActivationInt8WeightConfig`` on every Linear (the diffusers-torchao recipe), and (where the
``bench`` extra is installed) the same diffusers transformer converted to OpenVINO, in fp32, bf16 and
NNCF int8 (peers_openvino.py). Each row is
built and called once (its compile time), then the rows run in turn, ``--repeats`` rounds, so that a
drift of the machine's speed hits every row alike. Reported per row: median wall time with p20/p80,
median process CPU time (a steadier figure on a shared machine), SQNR of its output against the
eager fp32 cogvx step, achieved GFLOP/s, and its ratio to each peer: of the medians, and the median
(p20, p80) of the per-round ratios. One step = one transformer forward on the CFG batch.

    python benchmarks/sweep.py --preset cpu-bench --e2e                 # the CPU figures
    python benchmarks/sweep.py --preset cpu-long --repeats 3
    python benchmarks/sweep.py --preset cpu-bench --recipes none int8dq int8dq-cpu --peers diffusers-fp32

Writes benchmarks/results/sweep-<preset>-<device>-<date>-<commit>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from _util import RESULTS, cpu_model, git_commit, peak_rss, sqnr_db, write_report  # benchmarks/ is sys.path[0]
from cogvx.engine.models.positions import latent_frames, make_positions
from cogvx.engine.models.presets import PRESETS
from cogvx.engine.models.tokenizer import MAX_LENGTH
from cogvx.engine.models.transformer import build_transformer
from cogvx.engine.runtime.host_memory import keep_freed_memory
from cogvx.engine.runtime.profiling import transformer_flops
from peers import PEERS, E2E, base_engine, cogvx_e2e, cogvx_step, diffusers_e2e, diffusers_step
from peers_openvino import OPENVINO_PEERS, openvino_step
from report import chart, markdown


PEER_IMPLS = ("diffusers", "openvino")  # rows every other row is compared with
_HAS_OPENVINO = all(importlib.util.find_spec(m) for m in ("openvino", "nncf"))


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This CPU's measured dense matmul rate at n x n x n (the ceiling a step is compared with)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


def make_inputs(cfg, frames: int, height: int, width: int, videos: int, device, dtype, seed=0):
    """(latents [2V, F_lat, C, H/8, W/8], text [2V, 226, Dtext], timesteps [2V] = 501, positions)."""
    g = torch.Generator().manual_seed(seed)
    f_lat, _ = latent_frames(cfg, frames)
    lat = torch.randn(2 * videos, f_lat, cfg.in_channels, height // 8, width // 8, generator=g)
    text = torch.randn(2 * videos, MAX_LENGTH, cfg.text_embed_dim, generator=g)
    t = torch.full((2 * videos,), 501, dtype=torch.long)
    pos = make_positions(cfg, f_lat, height // 8, width // 8).to(device)
    return lat.to(device, dtype), text.to(device, dtype), t.to(device), pos


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def measure(rows, repeats: int, flops: int | None) -> list[dict]:
    """Warm every row up (compiles), then time the rows in turn, ``repeats`` rounds; SQNR against the
    first row's output (the quality reference of that kind) unless a reference was set."""
    outs, results = {}, []
    with torch.inference_mode():
        for r in rows:
            t0 = time.perf_counter()
            outs[r.name] = r.fn()
            results.append(dict(name=r.name, impl=r.impl, recipe=r.recipe, dtype=r.dtype, compiled=r.compiled,
                                kind=r.kind, first_call_s=time.perf_counter() - t0, times_s=[], cpu_s=[]))
            print(f"  ready: {r.name} (first call {results[-1]['first_call_s']:.1f} s)", flush=True)
        for i in range(repeats):
            for r, res in zip(rows, results):
                t0, c0 = time.perf_counter(), time.process_time()
                r.fn()
                res["times_s"].append(time.perf_counter() - t0)
                res["cpu_s"].append(time.process_time() - c0)
            print(f"  round {i + 1}/{repeats}: " + ", ".join(f"{x['name']} {x['times_s'][-1]:.2f}s" for x in results),
                  flush=True)
    for r, res in zip(rows, results):
        med = statistics.median(res["times_s"])
        res.update(median_s=med, p20_s=_pct(res["times_s"], 0.2), p80_s=_pct(res["times_s"], 0.8),
                   cpu_median_s=statistics.median(res["cpu_s"]), compile_s=max(res["first_call_s"] - med, 0.0),
                   gflops=flops / med / 1e9 if flops and r.kind == "step" else None, **r.extra)
        res["sqnr_db"] = sqnr_db(r.extra.get("reference", outs[rows[0].name]), outs[r.name])
    return results


def add_ratios(results: list[dict]) -> None:
    """Each row's ratio to each peer row of the same kind: of the medians, and the median / p20 / p80
    of the per-round ratios (rounds were timed back to back)."""
    for res in results:
        res["ratios"] = {}
        for peer in results:
            if peer["impl"] not in PEER_IMPLS or peer["kind"] != res["kind"]:
                continue
            paired = [a / b for a, b in zip(res["times_s"], peer["times_s"])]
            res["ratios"][peer["name"]] = dict(
                of_medians=res["median_s"] / peer["median_s"], paired_median=statistics.median(paired),
                paired_p20=_pct(paired, 0.2), paired_p80=_pct(paired, 0.8),
                cpu=res["cpu_median_s"] / peer["cpu_median_s"])


def profile_row(row, top: int = 14) -> list[dict]:
    """torch.profiler's top ops of one call of ``row`` by self CPU time (where the step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        row.fn()
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev) or 1
    return [dict(op=e.key, calls=e.count, self_ms=e.self_cpu_time_total / 1e3,
                 share=e.self_cpu_time_total / total) for e in ev[:top]]


def run(args) -> dict:
    device = torch.device("cpu")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    # What Engine.load sets on a CPU, set here for the whole process (every row, peers too: a peer's
    # steps reuse their freed activations alike); COGVX_CPU_MALLOC=system measures glibc's defaults.
    malloc = keep_freed_memory()
    preset = PRESETS[args.preset]
    cfg = preset.transformer
    frames, height, width = preset.num_frames, preset.height, preset.width
    torch.manual_seed(args.seed)
    base = build_transformer(cfg, device=device, dtype=torch.float32)
    inputs = make_inputs(cfg, frames, height, width, 1, device, torch.float32)
    lat, text, _, pos = inputs
    nv = pos.grid[0] * pos.grid[1] * pos.grid[2]
    flops = transformer_flops(cfg, lat.shape[0], text.shape[1], nv)
    attn_flops = cfg.num_layers * 2 * 2 * lat.shape[0] * (text.shape[1] + nv) ** 2 * cfg.inner_dim
    with torch.inference_mode():
        reference = base(*inputs).float()  # eager fp32 cogvx: every step row's quality reference
    rows = [cogvx_step(base, r, inputs, device, fuse_qkv=args.fuse_qkv) for r in args.recipes]
    rows += [diffusers_step(base, p, inputs, device) for p in args.peers if p in PEERS]
    rows += [openvino_step(base, p, inputs, torch.get_num_threads()) for p in args.peers if p in OPENVINO_PEERS]
    for r in rows:
        r.extra["reference"] = reference
    print(f"{args.preset}: {len(rows)} step rows, {flops / 1e9:.0f} GFLOP/step "
          f"({attn_flops / flops:.0%} attention)", flush=True)
    results = measure(rows, args.repeats, flops)
    profiles = {}
    for name in args.profile:
        row = next((r for r in rows if r.name == name or r.recipe == name and r.impl == "cogvx"), None)
        if row is not None:
            profiles[row.name] = profile_row(row)
    del rows
    e2e_error = None
    if args.e2e:
        try:  # a failure here keeps the step rows measured so far
            e = E2E(args.preset, steps=args.e2e_steps, t5_layers=args.t5_layers)
            eng = base_engine(e, device)
            e2e_rows = [cogvx_e2e(e, eng, r, device) for r in args.e2e_recipes]
            e2e_rows += [diffusers_e2e(e, eng, p, device) for p in args.e2e_peers]
            print(f"end to end: {len(e2e_rows)} rows", flush=True)
            results += measure(e2e_rows, args.e2e_repeats, None)
        except Exception as err:  # noqa: BLE001 - reported in the results, not lost
            e2e_error = f"{type(err).__name__}: {err}"
            print(f"end-to-end rows failed: {e2e_error}", file=sys.stderr)
    add_ratios(results)
    for r in results:
        r.pop("reference", None)
    meta = _meta(args, cfg, frames, height, width, lat, text, nv, flops, attn_flops)
    meta["e2e_error"], meta["malloc"] = e2e_error, malloc
    return dict(meta=meta, rows=results, profiles=profiles)


def _meta(args, cfg, frames, height, width, lat, text, nv, flops, attn_flops) -> dict:
    versions = {"torch": torch.__version__}
    for mod in ("diffusers", "torchao", "transformers", "openvino", "nncf"):
        try:
            versions[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            pass
    commit, dirty = git_commit()
    cpu = cpu_model()
    return dict(
        benchmark="denoising_step_sweep", device="cpu", device_name=f"cpu-{platform.machine()}", cpu=cpu,
        threads=torch.get_num_threads(), dtype="float32 (cogvx rows and diffusers fp32/int8dq; diffusers-bf16: bfloat16)",
        preset=args.preset, num_layers=cfg.num_layers, inner_dim=cfg.inner_dim, heads=cfg.num_attention_heads,
        frames=frames, height=height, width=width, cfg_batch=lat.shape[0], latent_shape=list(lat.shape),
        text_tokens=text.shape[1], video_tokens=nv, flops_per_step=flops, attention_flop_share=attn_flops / flops,
        fuse_qkv=args.fuse_qkv, repeats=args.repeats, e2e=dict(steps=args.e2e_steps, t5_layers=args.t5_layers,
                                                               repeats=args.e2e_repeats) if args.e2e else None,
        matmul_gflops_fp32=matmul_gflops(torch.float32), peak_rss_bytes=peak_rss(),
        load_average=list(__import__("os").getloadavg()), commit=commit, dirty=dirty,
        date=time.strftime("%Y-%m-%d %H:%M"), versions=versions)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-bench", choices=sorted(PRESETS))
    p.add_argument("--recipes", nargs="+", default=["none", "int8dq", "int8dq-cpu"],
                   help="cogvx rows ('none': fp32); the first is the quality reference's twin")
    p.add_argument("--peers", nargs="*", default=list(PEERS) + list(OPENVINO_PEERS if _HAS_OPENVINO else ()),
                   choices=PEERS + OPENVINO_PEERS, help="default: the diffusers rows, and the OpenVINO rows where "
                   "openvino and nncf are installed (pip install '.[bench]')")
    p.add_argument("--no-fuse-qkv", dest="fuse_qkv", action="store_false")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", nargs="*", default=["int8dq-cpu"],
                   help="rows (or cogvx recipes) to profile once with torch.profiler after timing")
    p.add_argument("--e2e", action="store_true", help="also time whole generations (text + steps + VAE decode)")
    p.add_argument("--e2e-recipes", nargs="+", default=["none", "int8dq-cpu"],
                   help="cogvx end-to-end rows; a recipe ending in +vae-bf16 decodes with a bf16 copy of the VAE")
    p.add_argument("--e2e-peers", nargs="*", default=["diffusers-fp32", "diffusers-int8dq"], choices=PEERS)
    p.add_argument("--e2e-steps", type=int, default=2)
    p.add_argument("--e2e-repeats", type=int, default=2)
    p.add_argument("--t5-layers", type=int, default=2, help="T5-XXL layers kept for --e2e (24: the real one)")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="directory for the json/md/png files")
    args = p.parse_args(argv)
    result = run(args)
    write_report(f"sweep-{args.preset}", result, markdown, chart, out=Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
