"""LoRA on a quantized transformer: merge before quantizing, or a full-precision side branch on the
quantized layers? Accuracy (SQNR of one forward against the fp32 model with the LoRA as a side branch)
and time of one forward, eager and compiled, rows timed alternately in one process.

    python -P benchmarks/bench_lora.py [--preset cpu-bench] [--recipe int8wo] [--rank 64] [--compile]

The LoRA is random (seeded) on to_q / to_k / to_v / to_out.0 of every block, sized so that
||up @ down|| is ``--delta`` (default 5 %) of each weight's norm, about what a trained style LoRA moves.
Writes benchmarks/results/lora-<device>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from cogvx.engine import Engine
from cogvx.engine.loading import merge_loras
from cogvx.engine.runtime.compiling import compile_module
from cogvx.quantize import quantize_
from cogvx.quantize.metrics import sqnr

sys.path.insert(0, str(Path(__file__).parent))
from _util import git_commit, write_results  # noqa: E402

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")


def make_lora(model, rank: int, delta: float, path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, blk in enumerate(model.transformer_blocks):
        for t in TARGETS:
            w = blk.get_submodule(t).weight
            down = torch.randn(rank, w.shape[1], generator=g)
            up = torch.randn(w.shape[0], rank, generator=g)
            up *= delta * w.float().norm() / (up @ down).norm()
            tensors[f"transformer.transformer_blocks.{i}.{t}.lora_A.weight"] = down.contiguous()
            tensors[f"transformer.transformer_blocks.{i}.{t}.lora_B.weight"] = up.contiguous()
    save_file(tensors, str(path))
    return path


def inputs(engine: Engine, batch: int):
    cfg = engine.config
    g = torch.Generator().manual_seed(1)
    f, h, w = 3, 30, 44
    lat = torch.randn(batch, f, cfg.in_channels, h, w, generator=g)
    text = torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    return lat, text, torch.full((batch,), 500), engine.positions(f, h, w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-bench")
    ap.add_argument("--recipe", default="int8wo")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the compiled forwards")
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())

    def fresh() -> Engine:
        return Engine.from_preset(args.preset, "cpu", torch.float32, text_encoder=False, vae=False, seed=0)

    ref = fresh()
    lora = make_lora(ref.transformer, args.rank, args.delta, tmp / "lora.safetensors")
    x = inputs(ref, args.batch)
    rows = {}
    with torch.inference_mode():
        base_out = ref.transformer(*x).float()
        ref.load_lora(lora)
        ref_out = ref.transformer(*x).float()
        rows["fp32 side branch"] = ref
        merged = fresh()
        merge_loras(merged.transformer, [(lora, 1.0)])
        rows["fp32 merged"] = merged
        a = fresh()
        merge_loras(a.transformer, [(lora, 1.0)])
        quantize_(a.transformer, args.recipe)
        rows[f"merge, then {args.recipe}"] = a
        b = fresh()
        quantize_(b.transformer, args.recipe)
        plain_q = b.transformer(*x).float()
        b.load_lora(lora)
        rows[f"{args.recipe} + fp32 side branch"] = b
        acc = {name: sqnr(ref_out, e.transformer(*x).float()) for name, e in rows.items()}
        acc[f"{args.recipe}, no LoRA (vs fp32 without LoRA)"] = sqnr(base_out, plain_q)
        acc["LoRA effect: fp32 without vs with LoRA"] = sqnr(ref_out, base_out)
        modes = {"eager": {n: e.transformer for n, e in rows.items()}}
        if args.compile:
            modes["compiled"] = {n: compile_module(e.transformer, True, torch.device("cpu")) for n, e in rows.items()}
            for fn in modes["compiled"].values():
                fn(*x)
        times = {m: {n: [] for n in fns} for m, fns in modes.items()}
        for _ in range(args.repeats):
            for m, fns in modes.items():
                for n, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(*x)
                    times[m][n].append(time.perf_counter() - t0)
    commit, dirty = git_commit()
    med = {m: {n: statistics.median(v) for n, v in t.items()} for m, t in times.items()}
    payload = dict(device="cpu-" + torch.backends.cpu.get_cpu_capability(), commit=commit + ("-dirty" if dirty else ""),
                   preset=args.preset, recipe=args.recipe, rank=args.rank, delta=args.delta, batch=args.batch,
                   threads=torch.get_num_threads(), sqnr_db=acc, median_s=med)
    print(f"{args.preset}, batch {args.batch}, rank {args.rank}, |delta W| / |W| = {args.delta}, fp32, "
          f"{torch.get_num_threads()} threads, commit {payload['commit']}")
    for n, v in acc.items():
        print(f"  SQNR {v:6.1f} dB  {n}")
    for m, t in med.items():
        base = t["fp32 merged"]
        for n, v in t.items():
            print(f"  {m:8s} {v * 1e3:8.1f} ms  ({v / base:.3f} x fp32 merged)  {n}")
    print("wrote", write_results("lora", payload))


if __name__ == "__main__":
    main()
