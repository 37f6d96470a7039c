"""Offload on CUDA at a real model's shape: step time and peak CUDA memory of no offload, model offload,
group offload (blocks streamed in groups, the next group's copy on a side stream from pinned memory) and
group offload without the stream, on one engine, the rows alternated --repeats times in one process.

The transformer has random weights at the preset's shape (default 5b: 42 blocks, bf16, 49 frames at
480x720, CFG batch 2); the prompt embeddings are random (no T5), the output is latents (no VAE), so the
figures are the denoising loop's. The target (issue 18): group with the stream within 15 % of no offload
in step time.

    python benchmarks/bench_offload.py                     # 5b, 3 steps, 2 repeats
    python benchmarks/bench_offload.py --preset 2b --group-size 2 --steps 4

Writes benchmarks/results/offload-steps-<preset>-<device>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from _util import git_commit, write_results  # benchmarks/ is sys.path[0]
from cogvx.engine import Engine
from cogvx.engine.models.presets import PRESETS

ROWS = ("none", "model", "group", "group-no-stream")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="5b", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=1)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_offload needs a CUDA device", file=sys.stderr)
        return 2
    p = PRESETS[args.preset]
    engine = Engine.from_preset(args.preset, device="cuda", text_encoder=False, vae=False)
    cfg = engine.config
    gen = torch.Generator("cuda").manual_seed(0)
    embeds = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, device="cuda", generator=gen,
                         dtype=engine.dtype)
    call = dict(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], num_frames=p.num_frames,
                height=p.height, width=p.width, num_inference_steps=args.steps, seed=0, output_type="latent")
    times: dict[str, list[float]] = {r: [] for r in args.rows}
    peaks: dict[str, int] = {}
    ref = None
    for rep in range(args.repeats + 1):  # the first round warms up (kernels, autotuning, pinned copies)
        for row in args.rows:
            mode = None if row == "none" else row.removesuffix("-no-stream")
            engine.enable_offload(mode, group_size=args.group_size, use_stream=not row.endswith("no-stream"))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = engine.generate(**call)
            torch.cuda.synchronize()
            peaks[row] = max(peaks.get(row, 0), torch.cuda.max_memory_allocated())
            if ref is None:
                ref = out.latents
            elif not torch.equal(out.latents, ref):
                print(f"warning: {row} latents differ from the first row's", file=sys.stderr)
            if rep:
                times[row].extend(out.profile.steps)
            print(f"round {rep} {row:16s} step median {statistics.median(out.profile.steps):.3f} s, "
                  f"peak {peaks[row] / 2**30:.2f} GiB", flush=True)
    engine.enable_offload(None)
    base = statistics.median(times["none"]) if "none" in times else None
    rows = [dict(row=r, step_median_s=statistics.median(t), steps=len(t), peak_cuda_gib=peaks[r] / 2**30,
                 vs_none=statistics.median(t) / base if base else None) for r, t in times.items()]
    for r in rows:
        print(f"{r['row']:16s} {r['step_median_s']:.3f} s/step ({r['vs_none'] or 0:.3f}x none), "
              f"peak {r['peak_cuda_gib']:.2f} GiB")
    commit, dirty = git_commit()
    path = write_results(f"offload-steps-{args.preset}", dict(
        device=torch.cuda.get_device_name(), commit=commit + ("-dirty" if dirty else ""), dtype=str(engine.dtype),
        shape=dict(frames=p.num_frames, height=p.height, width=p.width, batch=2, blocks=cfg.num_layers),
        group_size=args.group_size, repeats=args.repeats, rows=rows,
        target="group (with the stream) within 1.15x of none in step time"))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
