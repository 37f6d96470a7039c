"""The CPU C kernels alone (cogvx.kernels.cpu_kernels), against what they replace, rows timed alternately
in one process:

- attention at the cpu-bench and cpu-long shapes (2 x 30 heads of 64, 1216 and 9676 tokens): SDPA in
  fp32 (PyTorch's CPU flash kernel: what diffusers runs, and int8dq-cpu), ``chunked_attention`` in bf16
  (int8dq-cpu-bf16attn, compiled) and the int8 kernel (int8dq-cpu-int8attn), one row per variant this
  CPU runs (cogvx.kernels.cpu_isa: amx, avx512_vnni, avx512_bf16, avx_vnni, avx2); SQNR against float64
  attention on the first two heads. q and v are N(0, 1); k is N(0, 1) scaled and shifted per channel
  (post-LayerNorm keys with their bias), the case the kernel's smoothing is for.
- the feed-forward's GELU + int8 quantization at the cpu-bench and cpu-long token counts (2 x 1216 and
  2 x 9676 rows of 7680): the PyTorch form compiled by inductor (what int8dq-cpu ran before) against
  ``gelu_quant_rows`` per variant; the share of int8 levels that differ.

    python benchmarks/bench_cpu_kernels.py [--rounds 3] [--shapes cpu-bench]

Writes benchmarks/results/cpu-kernels-<device>-<date>-<commit>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from _util import cpu_model, git_commit, sqnr_db, write_report
from cogvx.engine.models.attention import chunked_attention
from cogvx.kernels import cpu_isa, cpu_kernels_unavailable, gelu_quant_rows, int8_attention
from cogvx.kernels.cpu_kernels import gelu_quant_rows_reference

SHAPES = {"cpu-bench": 1216, "cpu-long": 9676}


def _attention_inputs(seq: int, g: torch.Generator):
    q, k, v = (torch.randn(2, seq, 30, 64, generator=g).transpose(1, 2) for _ in range(3))
    k = k * (1 + torch.rand(64, generator=g)) + torch.randn(64, generator=g)
    return q, k, v


def _float64_heads(q, k, v, heads=2):
    q, k, v = (t[0, :heads].double() for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _alternate(rows: dict, rounds: int) -> dict[str, list[float]]:
    times = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            times[name].append(_timed(fn))
    return times


def _rows(what: str, shape: str, times: dict[str, list[float]], base: str, ratio_key: str, quality_key: str,
          quality: dict) -> list[dict]:
    """One result row per timed op: its median, the ratio of that to ``base``'s median, its quality figure."""
    med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    return [{"what": what, "shape": shape, "row": name, "median_ms": round(med[name] * 1e3, 2),
             ratio_key: round(med[name] / med[base], 3), quality_key: quality[name],
             "times_s": [round(t, 5) for t in ts]} for name, ts in times.items()]


def _here(kernel: str) -> list[str]:
    return [v for v in cpu_isa.runnable() if kernel in cpu_isa.VARIANTS[v][2]]


def attention_rows(rounds: int, g: torch.Generator, shapes) -> list[dict]:
    out = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    chunked = torch.compile(chunked_attention)
    for preset in shapes:
        seq = SHAPES[preset]
        q, k, v = _attention_inputs(seq, g)
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        rows = {"sdpa fp32": lambda: sdpa(q, k, v), "chunked bf16 (compiled)": lambda: chunked(qb, kb, vb)}
        for isa in _here("attention"):
            rows[f"int8 kernel ({isa})"] = lambda isa=isa: int8_attention(q, k, v, isa=isa)
        ref = _float64_heads(q, k, v).float()
        quality = {name: sqnr_db(ref, fn()[0, :2].float()) for name, fn in rows.items()}  # also the warm-up
        out += _rows("attention", f"{preset}: 2 x 30 heads x {seq} tokens x 64", _alternate(rows, rounds), "sdpa fp32",
                     "x_sdpa_fp32", "sqnr_db_vs_float64", {name: round(db, 1) for name, db in quality.items()})
    return out


def gelu_rows(rounds: int, g: torch.Generator, shapes) -> list[dict]:
    out = []
    compiled = torch.compile(gelu_quant_rows_reference)
    for preset in shapes:
        m = 2 * SHAPES[preset]
        acc = (3 * torch.randn(m, 7680, generator=g)).bfloat16()
        s, bias = torch.rand(m, 1, generator=g) + 0.5, torch.randn(7680, generator=g)
        rows = {"inductor (PyTorch form)": lambda: compiled(acc, s, bias)}
        for isa in _here("gelu_quant"):
            rows[f"C kernel ({isa})"] = lambda isa=isa: gelu_quant_rows(acc, s, bias, isa=isa)
        q0 = rows["inductor (PyTorch form)"]()[0]
        differ = {name: round((q0 != fn()[0]).double().mean().item(), 7) for name, fn in rows.items()}
        out += _rows("GELU + int8 quantization", f"{preset}: {m} x 7680 bf16", _alternate(rows, rounds),
                     "inductor (PyTorch form)", "x_inductor", "levels_differing", differ)
    return out


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"CPU kernels alone: {m['cpu']} ({m['threads']} threads), torch {m['torch']}, commit {m['commit']}"
             f"{' (dirty)' if m['dirty'] else ''}, {m['rounds']} alternating rounds, median.", "",
             "| what | shape | row | median ms | ratio | SQNR dB vs float64 / int8 levels differing |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = r.get("x_sdpa_fp32", r.get("x_inductor"))
        quality = r.get("sqnr_db_vs_float64", r.get("levels_differing"))
        lines.append(f"| {r['what']} | {r['shape']} | {r['row']} | {r['median_ms']} | {ratio} | {quality} |")
    return "\n".join(lines) + "\n\nratio: to SDPA fp32 (attention), to the inductor-compiled PyTorch form (GELU).\n"


def chart(result: dict, png) -> None:
    """Horizontal bars: each row's time over the op it replaces, a line at 1.0 (PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw

    rows = result["rows"]
    bar_h, left, width = 18, 420, 900
    img = Image.new("RGB", (width, 50 + bar_h * len(rows) + 24), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"cogvx CPU kernels alone: time / the op they replace, commit {result['meta']['commit']}", fill="black")
    ratios = [r.get("x_sdpa_fp32", r.get("x_inductor")) for r in rows]
    scale = (width - left - 60) / max(ratios + [1.0])
    y = 34
    for r, v in zip(rows, ratios):
        d.text((10, y + 2), f"{r['shape'].split(':')[0]} {r['what'][:9]}: {r['row']}", fill="black")
        d.rectangle([left, y, left + int(v * scale), y + bar_h - 4], fill=(136, 136, 136) if v == 1 else (34, 170, 119))
        d.text((left + int(v * scale) + 4, y + 2), f"{v:.2f}", fill="black")
        y += bar_h
    d.line([left + int(scale), 30, left + int(scale), y], fill="black")
    d.text((left + int(scale) + 3, y + 4), "1.0 = the op replaced", fill="black")
    img.save(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    why = cpu_kernels_unavailable()
    if why:
        raise SystemExit(f"the CPU kernels cannot run here: {why}")
    g = torch.Generator().manual_seed(0)
    commit, dirty = git_commit()
    with torch.inference_mode():
        rows = attention_rows(args.rounds, g, args.shapes) + gelu_rows(args.rounds, g, args.shapes)
    flags = sorted(f for f in cpu_isa.cpu_flags() if f.startswith(("avx", "amx", "fma")))
    meta = {"device_name": f"cpu-{platform.machine()}", "cpu": f"{cpu_model()} ({' '.join(flags)})",
            "variants": cpu_isa.runnable(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit, "dirty": dirty,
            "rounds": args.rounds}
    write_report("cpu-kernels", {"meta": meta, "rows": rows}, markdown, chart, out=args.out)


if __name__ == "__main__":
    main()
