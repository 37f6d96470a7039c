"""VAE decode peak memory against the number of frames, with and without tiling.

Each configuration runs in its own process so peaks do not mix. The model is the real CogVideoX VAE
architecture (VAEConfig.real("5b")) with random weights. On CUDA the figure is
torch.cuda.max_memory_allocated above the memory held before the decode; on the CPU it is the peak
resident set size (VmHWM, reset through /proc/self/clear_refs just before the decode) above the
resident size at that moment; the children run with glibc's mmap threshold lowered so that resident
size tracks live memory (otherwise the heap glibc keeps after frees grows with every frame batch). The decoded video itself
(3 x F x H x W floats) is part of the peak and is reported beside it.

    python benchmarks/bench_vae_memory.py                      # CPU: 64x96 px, fp32
    python benchmarks/bench_vae_memory.py --height 480 --width 720 --frames 9 17 25 49   # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _util import (  # benchmarks/ is sys.path[0]
    child_result, current_rss, git_commit, peak_rss, reset_peak_rss, results_path, run_child)

MODES = ("frame-batched", "tiled", "one-batch")


def _child(mode: str, frames: int, height: int, width: int, dtype_name: str, device: str) -> dict:
    import torch

    from cogvx.engine.models.config import VAEConfig
    from cogvx.engine.models.vae import CogVideoXVAE

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    vae = CogVideoXVAE(VAEConfig.real("5b")).to(device=device, dtype=dtype).eval()
    if mode == "tiled":
        # Tiles of half the frame in each direction: 4 tiles whatever the frame count.
        vae.enable_tiling(tile_sample_min_height=height // 2, tile_sample_min_width=width // 2,
                          tile_overlap_factor_height=1 / 4, tile_overlap_factor_width=1 / 4)
    elif mode == "one-batch":
        vae.num_latent_frames_batch_size = 10**6  # all latent frames in one batch: what batching saves
    lat_frames = (frames - 1) // 4 + 1
    z = torch.randn(1, 16, lat_frames, height // 8, width // 8, device=device, dtype=dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = current_rss()
    t0 = time.perf_counter()
    out = vae.decode(z)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    return dict(mode=mode, frames=int(out.shape[2]), latent_frames=lat_frames, peak_bytes=int(peak),
                output_bytes=out.numel() * out.element_size(), seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33, 49])
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, frames, h, w, dt, dev = args.child
        child_result(_child(mode, int(frames), int(h), int(w), dt, dev))
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    rows = []
    for mode in args.modes:
        for f in args.frames:
            # Large buffers through mmap: freed memory goes back to the OS at once, so the resident-size
            # peak follows live memory instead of glibc's retained heap (which grows with every batch).
            env = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
            try:
                r = run_child(__file__, mode, str(f), str(args.height), str(args.width), dtype, device, env=env,
                              cwd=Path(__file__).resolve().parents[1])
            except RuntimeError as e:
                print(e, file=sys.stderr)
                return 1
            rows.append(r)
            print(f"{mode:>13}  {r['frames']:3d} frames ({r['latent_frames']:2d} latent)  peak "
                  f"{r['peak_bytes'] / 2**20:8.1f} MiB  (output {r['output_bytes'] / 2**20:6.1f} MiB)  "
                  f"{r['seconds']:6.1f} s", flush=True)
    meta = _meta(device, dtype, args)
    path = results_path("vae-memory", meta["device_name"], meta["commit"])
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _meta(device: str, dtype: str, args) -> dict:
    import platform

    import torch

    commit, dirty = git_commit()
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{platform.machine()}"
    return dict(benchmark="vae_decode_peak_memory", device=device, device_name=name, dtype=dtype,
                vae="VAEConfig.real('5b'), random weights", height=args.height, width=args.width,
                batch=1, commit=commit, dirty=dirty, date=time.strftime("%Y%m%d"), torch=torch.__version__,
                unit="bytes above the pre-decode baseline")


if __name__ == "__main__":
    sys.exit(main())
