"""The sweep's markdown table and chart: every figure beside its ratio to each peer."""

from __future__ import annotations

from pathlib import Path

PEER_COLOURS = ["#c44", "#e90", "#6a3", "#36c", "#939", "#0aa", "#777", "#a50"]


def _peers(result: dict, kind: str) -> list[str]:
    return [r["name"] for r in result["rows"] if r["impl"] in ("diffusers", "openvino") and r["kind"] == kind]


def _ratio(r: dict, peer: str) -> str:
    x = r["ratios"].get(peer)
    if x is None:
        return "-"
    return f"{x['paired_median']:.2f} ({x['paired_p20']:.2f}-{x['paired_p80']:.2f}; cpu {x['cpu']:.2f})"


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"CPU: {m['cpu']} ({m['threads']} threads; load average at the end {m['load_average'][0]:.1f}), "
        f"preset {m['preset']}: {m['num_layers']} layer(s), D={m['inner_dim']}, {m['heads']} heads, {m['frames']} "
        f"frames at {m['width']}x{m['height']}, CFG batch {m['cfg_batch']}, {m['text_tokens']}+{m['video_tokens']} "
        f"tokens, {m['flops_per_step'] / 1e9:.0f} GFLOP/step ({m['attention_flop_share']:.0%} attention); "
        f"dtype {m['dtype']}; q/k/v fused: {m['fuse_qkv']}; commit {m['commit']}{' (dirty)' if m['dirty'] else ''}, "
        f"{m['date']}; fp32 matmul {m['matmul_gflops_fp32']:.0f} GFLOP/s; {m['repeats']} alternating rounds"
        f"{'; glibc malloc (every row): ' + m['malloc'] if m.get('malloc') else ''}.",
        "",
        "Ratio cells: median of the per-round ratios (p20-p80; ratio of median process CPU times).",
        "",
    ]
    for kind, title in (("step", "One denoising step"), ("e2e", "End to end")):
        rows = [r for r in result["rows"] if r["kind"] == kind]
        if not rows:
            continue
        peers = _peers(result, kind)
        if kind == "e2e":
            e = m["e2e"]
            lines += [f"{title}: prompt -> {e['steps']} denoising steps (CFG) -> VAE decode, T5-XXL cut to "
                      f"{e['t5_layers']} layers, real VAE, {e['repeats']} alternating rounds.", ""]
        else:
            lines += [f"{title}:", ""]
        head = "| row | dtype | median ms | p20-p80 ms | cpu ms | SQNR dB | GFLOP/s | " + \
               " | ".join(f"x {p}" for p in peers) + " |"
        lines += [head, "|" + "---|" * (7 + len(peers))]
        for r in rows:
            gf = f"{r['gflops']:.0f}" if r.get("gflops") else "-"
            lines.append(
                f"| {r['name']} | {r['dtype']} | {r['median_s'] * 1e3:.0f} | {r['p20_s'] * 1e3:.0f}-{r['p80_s'] * 1e3:.0f}"
                f" | {r['cpu_median_s'] * 1e3:.0f} | {r['sqnr_db']:.1f} | {gf} | "
                + " | ".join(_ratio(r, p) for p in peers) + " |")
        for r in rows:
            if r.get("stages"):
                lines.append(f"\n{r['name']} stages (last run, s): "
                             + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()))
        lines.append("")
    for name, ops in result.get("profiles", {}).items():
        lines += [f"Where the time goes: {name}, one step under torch.profiler (self CPU time):", "",
                  "| op | calls | self ms | share |", "|---|---|---|---|"]
        lines += [f"| {o['op']} | {o['calls']} | {o['self_ms']:.1f} | {o['share']:.1%} |" for o in ops]
        lines.append("")
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    """Horizontal bars: each row's time as a multiple of each peer (paired-round median), one colour
    per peer, a line at 1.0 (drawn with PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw

    rows = result["rows"]
    groups = [(r, [(p, r["ratios"][p]["paired_median"]) for p in _peers(result, r["kind"]) if p in r["ratios"]])
              for r in rows]
    groups = [(r, bars) for r, bars in groups if bars]
    bar_h, gap, left, width = 14, 10, 260, 980
    height = 70 + sum(len(b) * bar_h + gap for _, b in groups) + 20 * len(PEER_COLOURS)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    m = result["meta"]
    d.text((10, 8), f"time as a multiple of each peer (median of per-round ratios), {m['preset']}, {m['cpu']}, "
                    f"{m['threads']} threads, commit {m['commit']}", fill="black")
    top = max([v for _, bars in groups for _, v in bars] + [1.0]) * 1.1
    scale = (width - left - 70) / top
    y = 34
    x1 = left + int(scale)
    peers = list(dict.fromkeys(p for _, bars in groups for p, _ in bars))
    colour = {p: PEER_COLOURS[i % len(PEER_COLOURS)] for i, p in enumerate(peers)}
    for r, bars in groups:
        d.text((10, y + 2), f"{r['name']} ({r['kind']})", fill="black")
        for p, v in bars:
            d.rectangle([left, y, left + int(v * scale), y + bar_h - 3], fill=colour[p])
            d.text((left + int(v * scale) + 4, y), f"{v:.2f}", fill="black")
            y += bar_h
        y += gap
    d.line([x1, 30, x1, y], fill="black")
    d.text((x1 + 3, y), "1.0 = the peer", fill="black")
    y += 20
    for p in peers:
        d.rectangle([10, y + 2, 24, y + 12], fill=colour[p])
        d.text((30, y), f"x {p}", fill="black")
        y += 18
    img.save(path)
