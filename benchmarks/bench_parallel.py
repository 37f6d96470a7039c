"""Parallel generate on the CPU: 2 processes x 1 thread (gloo) against 1 process x 1 thread, per denoising
step, for parallel="cfg" and "ulysses", and where the VAE decode should run.

One pair of processes holds three engines of the same random weights (``Engine.from_preset``; prompt
embeddings given, no text encoder): the single-process baseline (run by rank 0 while rank 1 waits in a
barrier), a CFG-parallel one and a Ulysses one. Each round runs the three one after the other, in an
order that rotates from round to round, so every row sees the same machine load; the figures are medians
over every step of every round, with the 20th/80th percentiles, and the speedup is also given as the
median of each round's own ratio. The collective time is what the profile reports (time inside the
all-gathers and all-to-alls, including waiting for the other rank). On a shared machine the wall clock
measures the other users as much as this code, so each row also reports the CPU seconds per step of its
busiest rank (process time: what the step costs that rank however long the scheduler makes it wait) and
the speedup those give, which is what an idle machine would show less the communication time (waiting in
gloo takes no CPU). ``--decode`` also times the VAE:
rank 0 decoding alone (untiled, the default), rank 0 decoding tiles alone, and the tiles spread over both
ranks (what a parallel engine does when tiling is on).

    python benchmarks/bench_parallel.py                      # cpu-bench preset: 2 layers of 2b width
    python benchmarks/bench_parallel.py --rounds 5 --steps 3 --decode
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _util import cpu_model, git_commit, results_path  # benchmarks/ is sys.path[0]

from cogvx.engine import Engine
from cogvx.engine.models.vae import unscale_latents
from cogvx.engine.parallel import gather_floats
from cogvx.engine.parallel.decode import decode_tiles

MODES = ("single", "cfg", "ulysses")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _summary(xs: list[float]) -> dict:
    return dict(median=statistics.median(xs), p20=_pct(xs, 0.2), p80=_pct(xs, 0.8), min=min(xs), max=max(xs), n=len(xs))


def _worker(args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    kw = dict(preset=args.preset, text_encoder=False, vae=args.decode, seed=0)
    engines = {"cfg": Engine.from_preset(**kw, parallel="cfg"), "ulysses": Engine.from_preset(**kw, parallel="ulysses")}
    if rank == 0:
        engines["single"] = Engine.from_preset(**kw)
    cfg = engines["cfg"].config
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(1, 226, cfg.text_embed_dim, generator=g) for _ in range(2)]
    gen = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_frames=args.frames, height=args.height,
               width=args.width, guidance_scale=6.0, seed=0, output_type="latent")

    def run(mode: str, steps: int):
        """(rank 0's result, every rank's CPU seconds per step) of one generate of ``mode``."""
        c0 = time.process_time()
        if mode == "single":
            r = engines["single"].generate(**gen, num_inference_steps=steps) if rank == 0 else None
            dist.barrier()
        else:
            r = engines[mode].generate(**gen, num_inference_steps=steps)
        return r, [row[0] for row in gather_floats([(time.process_time() - c0) / steps], torch.device("cpu"))]

    latents, shape = {}, None
    for mode in MODES:  # warm-up (first-call allocations), and the latents for the equality check
        r, _ = run(mode, args.steps)
        if r is not None:
            latents[mode] = r.latents
    rows = {m: dict(steps=[], round_medians=[], cpu_per_step=[], collective_per_step=[],
                    collective_per_step_rank1=[]) for m in MODES}
    for rnd in range(args.rounds):
        for mode in MODES[rnd % 3:] + MODES[: rnd % 3]:
            r, cpu = run(mode, args.steps)
            if rank != 0:
                continue
            shape = r.profile.shape
            rows[mode]["steps"] += r.profile.steps
            rows[mode]["round_medians"].append(r.profile.step_median)
            rows[mode]["cpu_per_step"].append(cpu[0] if mode == "single" else max(cpu))
            if mode != "single":
                p = r.profile.parallel
                rows[mode]["collective_per_step"].append(p["collective_seconds"] / args.steps)
                rows[mode]["collective_per_step_rank1"].append(p["ranks"][1]["collective_seconds"] / args.steps)
    decode = _decode_rows(args, engines, rank) if args.decode else None
    if rank == 0:
        out = dict(rows=rows, decode=decode, shape=shape, heads=cfg.num_attention_heads, inner_dim=cfg.inner_dim,
                   layers=cfg.num_layers)
        out["rel_l2_vs_single"] = {m: float((latents[m] - latents["single"]).norm() / latents["single"].norm())
                                   for m in ("cfg", "ulysses")}
        Path(args.worker_out).write_text(json.dumps(out))
    dist.destroy_process_group()


def _decode_rows(args, engines: dict, rank: int) -> dict:
    """Seconds of one VAE decode: rank 0 alone untiled, rank 0 alone tiled, tiles over both ranks."""
    engine = engines["cfg"]
    vae, mesh = engine.vae, engine.parallel.mesh
    lat = torch.randn(1, args.decode_latent_frames, vae.config.latent_channels, args.decode_height // 8,
                      args.decode_width // 8, generator=torch.Generator().manual_seed(1))
    z = unscale_latents(lat.permute(0, 2, 1, 3, 4), vae.config)
    th, tw = args.decode_tile
    times = {"rank0-untiled": [], "rank0-tiled": [], "tiles-over-ranks": []}
    cpu = {k: [] for k in times}
    order = list(times)
    for rnd in range(args.decode_rounds):
        for name in order[rnd % 3:] + order[: rnd % 3]:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "tiles-over-ranks":
                vae.enable_tiling(tile_sample_min_height=th, tile_sample_min_width=tw)
                decode_tiles(vae, z, mesh)
            elif rank == 0:
                if name == "rank0-tiled":
                    vae.enable_tiling(tile_sample_min_height=th, tile_sample_min_width=tw)
                else:
                    vae.disable_tiling()
                vae.decode(z)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(max(row[0] for row in gather_floats([time.process_time() - c0], torch.device("cpu"))))
            vae.disable_tiling()
    dist.barrier()
    return dict(latents=list(lat.shape), pixels=[args.decode_height, args.decode_width], tile=[th, tw],
                seconds={k: _summary(v) for k, v in times.items()},
                cpu_seconds_busiest_rank={k: _summary(v) for k, v in cpu.items()})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-bench")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=352)
    ap.add_argument("--steps", type=int, default=3, help="denoising steps per timed generate")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--decode", action="store_true", help="also time the VAE decode placements")
    ap.add_argument("--decode-latent-frames", type=int, default=1)
    ap.add_argument("--decode-height", type=int, default=320)
    ap.add_argument("--decode-width", type=int, default=480)
    ap.add_argument("--decode-tile", type=int, nargs=2, default=[192, 240],
                    help="tile size in pixels, h w (192 240 keeps diffusers' overlaps exact)")
    ap.add_argument("--decode-rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if "RANK" in os.environ:
        return _worker(args)

    commit, dirty = git_commit()
    tmp = Path(results_path("parallel", "cpu", commit, suffix=".part.json", out=args.out))
    port, procs = _free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker-out", str(tmp)],
                                      env=env))
    if any(p.wait() != 0 for p in procs):
        sys.exit("a benchmark process failed")
    res = json.loads(tmp.read_text())
    tmp.unlink()
    rows = res.pop("rows")
    single = _summary(rows["single"]["steps"])
    table = {"single": dict(step_seconds=single, speedup=1.0,
                            cpu_seconds_per_step_busiest_rank=_summary(rows["single"]["cpu_per_step"]))}
    for m in ("cfg", "ulysses"):
        ratios = [a / b for a, b in zip(rows["single"]["round_medians"], rows[m]["round_medians"])]
        step = _summary(rows[m]["steps"])
        coll = statistics.median(rows[m]["collective_per_step"])
        cpu_ratio = statistics.median(rows["single"]["cpu_per_step"]) / statistics.median(rows[m]["cpu_per_step"])
        table[m] = dict(step_seconds=step, speedup=single["median"] / step["median"],
                        cpu_seconds_per_step_busiest_rank=_summary(rows[m]["cpu_per_step"]), cpu_time_speedup=cpu_ratio,
                        speedup_per_round=_summary(ratios), collective_seconds_per_step=_summary(
                            rows[m]["collective_per_step"]),
                        collective_seconds_per_step_rank1=_summary(rows[m]["collective_per_step_rank1"]),
                        collective_share=coll / step["median"])
    cpu = cpu_model()
    doc = dict(what="denoising step, 2 processes x 1 thread (gloo) vs 1 process x 1 thread", device="cpu", cpu=cpu,
               cores=os.cpu_count(), load_average=os.getloadavg(), dtype="float32", commit=commit, dirty_tree=dirty,
               python=platform.python_version(), command=" ".join([sys.executable, *sys.argv]),
               preset=args.preset, frames=args.frames, height=args.height, width=args.width,
               steps_per_generate=args.steps, rounds=args.rounds, **res, results=table)
    path = results_path("parallel", "cpu-x86-64", commit, out=args.out)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{args.preset}: {doc['layers']} layers, D={doc['inner_dim']}, {doc['heads']} heads, shape {doc['shape']}, "
          f"fp32, commit {commit}{' (dirty)' if dirty else ''}")
    for m, r in table.items():
        s = r["step_seconds"]
        line = f"  {m:8s} step {s['median']:.3f} s (p20 {s['p20']:.3f}, p80 {s['p80']:.3f}, n {s['n']})"
        if m != "single":
            line += (f"  speedup {r['speedup']:.2f}x (per round {r['speedup_per_round']['median']:.2f}x, "
                     f"{r['speedup_per_round']['min']:.2f}-{r['speedup_per_round']['max']:.2f}; CPU time "
                     f"{r['cpu_time_speedup']:.2f}x)  collectives {r['collective_seconds_per_step']['median']:.3f} "
                     f"s/step ({100 * r['collective_share']:.0f}%)")
        line += f"  CPU {r['cpu_seconds_per_step_busiest_rank']['median']:.3f} s/step"
        print(line)
    if res.get("decode"):
        for k, v in res["decode"]["seconds"].items():
            c = res["decode"]["cpu_seconds_busiest_rank"][k]
            print(f"  decode {k:17s} {v['median']:.2f} s (min {v['min']:.2f}, max {v['max']:.2f}, n {v['n']}); "
                  f"busiest rank CPU {c['median']:.2f} s")
    print(f"  rel L2 vs single: {res['rel_l2_vs_single']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
