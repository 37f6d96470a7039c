"""Compile every Triton kernel for sm_80, sm_89 and sm_90 on this machine (no GPU needed) and check
its registers, spills and shared memory.

    python -P -m cogvx.kernels.aot [--quick] [--targets 80,89,90] [--json PATH] [--jobs N]

Each kernel is compiled at the specializations the real models launch it with (CogVideoX-2b:
30 heads, D 1920, no RoPE; 5b: 48 heads, D 3072, RoPE; 1.5-5b: 48 heads, D 3072, RoPE, 81 frames at
768x1360), in float16 and bfloat16, for every configuration its launcher can pick on that target:
the launchers' own ``launch_plan`` functions build the arguments (on meta tensors) and Triton's own
argument specialization turns them into the signature, exactly as a launch would. The resource
figures come from ``ptxas -v`` of the generated PTX, using the ptxas shipped in the triton wheel
(``ptxas-blackwell``, which reads the PTX version Triton 3.9 emits). Exit status 1 on a compile
failure, a register spill, or shared memory over the target's per-block limit; 2 on bad usage.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import _common
from .adaln import _adaln_kernel
from .adaln import launch_plan as adaln_plan
from .adaln_fp8 import _adaln_fp8_kernel, fp8_launch_plan
from .qk_norm_rope import _qk_norm_rope_kernel
from .qk_norm_rope import launch_plan as qk_plan
from .rope_flash_attention import _rope_flash_attn_kernel, flash_configs
from .rope_flash_attention import launch_plan as flash_plan
from .sage_attention import _sage_attn_kernel, sage_configs
from .sage_attention import launch_plan as sage_plan
from .sage_quant import _sage_quant_kernel
from .sage_quant import launch_plan as sage_quant_plan

__all__ = ["MODELS", "SMEM_LIMITS", "jobs", "main"]

# Per-block shared memory a kernel may use (opt-in maximum), bytes.
SMEM_LIMITS = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
N_TEXT, HEAD_DIM, BATCH = 226, 64, 2  # T5 tokens; every model's head dim; CFG batch


@dataclass(frozen=True)
class Model:
    heads: int
    rope: bool
    n_video: int  # latent frames x (H/16) x (W/16) of the model's sample size

    @property
    def dim(self) -> int:
        return self.heads * HEAD_DIM

    @property
    def seq(self) -> int:
        return N_TEXT + self.n_video


MODELS = {
    "2b": Model(heads=30, rope=False, n_video=13 * 30 * 45),  # 49 frames at 480x720
    "5b": Model(heads=48, rope=True, n_video=13 * 30 * 45),
    "1.5-5b": Model(heads=48, rope=True, n_video=11 * 48 * 85),  # 81 frames at 768x1360, patch_t 2
}


@dataclass(frozen=True)
class Job:
    kernel: str  # adaln | adaln_fp8 | qk_norm_rope | rope_flash_attention | sage_quant | sage_attention
    model: str
    dtype: str
    variant: str  # "delta"/"no delta", "rope"/"no rope", "q"/"k smoothed" (sage_quant), "int8" (sage_attention)
    config_index: int  # index into the launcher's configurations (flash attention), else 0
    target: int  # compute capability, e.g. 90


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _flash_configs(target: int, has_rope: bool) -> list:
    return flash_configs((target // 10, target % 10), has_rope)


def _sage_configs(target: int) -> list:
    return sage_configs((target // 10, target % 10))


def jobs(models, dtypes, targets) -> list[Job]:
    """Every (kernel, specialization, configuration, target) the launchers can produce."""
    out = []
    for target in targets:
        for name in models:
            m = MODELS[name]
            for dt in dtypes:
                for variant in ("no delta", "delta"):
                    out.append(Job("adaln", name, dt, variant, 0, target))
                    if target >= 89:  # below sm_89 the dispatcher runs the reference (no fp8 conversion)
                        out.append(Job("adaln_fp8", name, dt, variant, 0, target))
                for variant in (("rope", "no rope") if m.rope else ("no rope",)):
                    out.append(Job("qk_norm_rope", name, dt, variant, 0, target))
                variant = "rope" if m.rope else "no rope"
                for i in range(len(_flash_configs(target, m.rope))):
                    out.append(Job("rope_flash_attention", name, dt, variant, i, target))
                for variant in ("q", "k smoothed"):
                    out.append(Job("sage_quant", name, dt, variant, 0, target))
                for i in range(len(_sage_configs(target))):
                    out.append(Job("sage_attention", name, dt, "int8", i, target))
    return out


def _launch(job: Job):
    """(kernel, positional arguments, keyword arguments, config label) as the launcher passes them."""
    m, dt = MODELS[job.model], DTYPES[job.dtype]
    B, S, D, H = BATCH, m.seq, m.dim, m.heads
    if job.kernel in ("adaln", "adaln_fp8"):
        x, p, w = _meta(B, S, D, dtype=dt), _meta(B, 2, D, dtype=dt), _meta(D, dtype=dt)
        delta, gate = (_meta(B, S, D, dtype=dt), p) if job.variant == "delta" else (None, None)
        x_out = _meta(B, S, D, dtype=dt) if delta is not None else None
        if job.kernel == "adaln":
            _, args, kw = adaln_plan(x, delta, gate, w, w, p, p, N_TEXT, 1e-5, (x_out, _meta(B, S, D, dtype=dt)),
                                            interpreted=False)  # fmt: skip
            kernel = _adaln_kernel
        else:
            q_out, s_out = _meta(B, S, D, dtype=torch.float8_e4m3fn), _meta(B, S, 1)
            _, args, kw = fp8_launch_plan(x, delta, gate, w, w, p, p, N_TEXT, 1e-5, x_out, q_out, s_out,
                                                    interpreted=False)  # fmt: skip
            kernel = _adaln_fp8_kernel
        return kernel, args, kw, f"BLOCK_R={kw['BLOCK_R']} BLOCK_D={kw['BLOCK_D']} w{kw['num_warps']}"
    # The engine's fused projection: q, k, v are strided [B, S, H, Dh] views of one [B, S, 3D] output.
    q, k, v = _meta(B, S, 3 * D, dtype=dt).view(B, S, 3, H, HEAD_DIM).unbind(2)
    rope = job.variant == "rope"
    cos, sin = (_meta(m.n_video, HEAD_DIM), _meta(m.n_video, HEAD_DIM)) if rope else (None, None)
    if job.kernel == "qk_norm_rope":
        w, outs = _meta(HEAD_DIM, dtype=dt), (_meta(B, H, S, HEAD_DIM, dtype=dt), _meta(B, H, S, HEAD_DIM, dtype=dt))
        _, args, kw = qk_plan(q, k, w, w, w, w, cos, sin, N_TEXT, 0, 1e-6, *outs, interpreted=False)
        return _qk_norm_rope_kernel, args, kw, f"BLOCK_S={kw['BLOCK_S']} w{kw['num_warps']}"
    qn, kn, out = (_meta(B, H, S, HEAD_DIM, dtype=dt) for _ in range(3))  # q, k: the QK kernel's outputs
    if job.kernel == "sage_quant":  # of the QK kernel's contiguous output
        mean = _meta(B, H, 1, HEAD_DIM) if job.variant == "k smoothed" else None
        codes, scales = _meta(B, H, S, HEAD_DIM, dtype=torch.int8), _meta(B, H, S)
        _, args, kw = sage_quant_plan(kn, mean, 0.18, codes, scales, interpreted=False)
        return _sage_quant_kernel, args, kw, f"BLOCK_S={kw['BLOCK_S']} w{kw['num_warps']}"
    if job.kernel == "sage_attention":
        q8, k8 = _meta(B, H, S, HEAD_DIM, dtype=torch.int8), _meta(B, H, S, HEAD_DIM, dtype=torch.int8)
        args, kw = sage_plan(q8, _meta(B, H, S), k8, _meta(B, H, S), v.transpose(1, 2), out)
        cfg = _sage_configs(job.target)[job.config_index]
        kw = dict(kw, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return _sage_attn_kernel, args, kw, f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
    args, kw = flash_plan(qn, kn, v.transpose(1, 2), cos, sin, N_TEXT, out)
    cfg = _flash_configs(job.target, rope)[job.config_index]
    kw = dict(kw, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    label = f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
    return _rope_flash_attn_kernel, args, kw, label


def _ptxas() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this check needs the ptxas that ships in the triton wheel "
                                "(triton 3.9 for Linux x86-64); reinstall triton")  # fmt: skip
    return path


def _resources(ptx: str) -> dict:
    """registers, spill bytes and static shared memory of the one kernel in ``ptx`` (ptxas -v)."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        cmd = [str(_ptxas()), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src),
               "-o", str(Path(tmp, "k.cubin"))]  # fmt: skip  (the flags Triton passes)
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    used = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return {"registers": int(used.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "static_smem": int(smem.group(1)) if smem else 0}  # fmt: skip


def compile_job(job: Job) -> dict:
    """Compile one job for its target and return its table row (status "ok", "spill", "smem" or "error")."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    row = dict(asdict(job), config="?")
    try:
        kernel, args, kw, row["config"] = _launch(job)
        target = GPUTarget("cuda", job.target, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kw)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)  # fmt: skip
        row.update(_resources(compiled.asm["ptx"]))
        row["smem"] = compiled.metadata.shared + row.pop("static_smem")
    except Exception as e:  # a row that says why, not a traceback that hides the rest of the table
        row.update(status="error", error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
        return row
    row["smem_limit"] = SMEM_LIMITS[job.target]
    row["status"] = ("spill" if row["spill_stores"] or row["spill_loads"] else
                     "smem" if row["smem"] > row["smem_limit"] else "ok")  # fmt: skip
    return row


def format_table(rows: list[dict]) -> str:
    head = ["kernel", "model", "dtype", "variant", "config", "target", "regs", "spill st/ld B", "smem B",
            "limit B", "status"]  # fmt: skip
    lines = [head]
    for r in rows:
        ok = "registers" in r
        lines.append([r["kernel"], r["model"], r["dtype"], r["variant"], r.get("config", "?"), f"sm_{r['target']}",
                      str(r["registers"]) if ok else "-", f"{r['spill_stores']}/{r['spill_loads']}" if ok else "-",
                      str(r["smem"]) if ok else "-", str(r.get("smem_limit", "-")),
                      r["status"] + (f" ({r['error']})" if "error" in r else "")])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    out = [fmt.format(*lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [fmt.format(*line) for line in lines[1:]])


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -P -m cogvx.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="80,89,90", help="compute capabilities, comma-separated (default 80,89,90)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--dtypes", default="float16,bfloat16", help="comma-separated, of float16, bfloat16")
    p.add_argument("--quick", action="store_true",
                   help="a representative subset: every kernel and target, 5b (RoPE) and 2b (no RoPE), bfloat16 only")
    p.add_argument("--json", type=Path, help="also write the table (and the tool versions) to this JSON file")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles (default 2)")
    args = p.parse_args(argv)
    args.targets = [int(t) for t in args.targets.split(",")]
    args.models, args.dtypes = args.models.split(","), args.dtypes.split(",")
    if args.quick:
        args.models, args.dtypes = ["5b", "2b"], ["bfloat16"]
    for name, values, known in (("targets", args.targets, SMEM_LIMITS), ("models", args.models, MODELS),
                                ("dtypes", args.dtypes, DTYPES)):  # fmt: skip
        bad = [v for v in values if v not in known]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {', '.join(map(str, known))}")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if not _common.HAS_TRITON or _common.kernels_interpreted():
        print("cogvx.kernels.aot compiles for GPUs: it needs triton and the kernels defined without "
              "TRITON_INTERPRET=1 (got " + ("no triton" if not _common.HAS_TRITON else "TRITON_INTERPRET=1") +
              "); run it as: env -u TRITON_INTERPRET python -P -m cogvx.kernels.aot", file=sys.stderr)  # fmt: skip
        return 2
    todo = jobs(args.models, args.dtypes, args.targets)
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(compile_job, todo))
    else:
        rows = [compile_job(j) for j in todo]
    print(format_table(rows))
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"\n{len(rows)} compiles ({len(rows) - len(bad)} ok) for sm_{', sm_'.join(map(str, args.targets))}; "
          f"models {', '.join(args.models)}; {', '.join(args.dtypes)}")  # fmt: skip
    for r in bad:
        print(f"FAILED: {r['kernel']} {r['model']} {r['dtype']} {r['variant']} {r.get('config', '')} sm_{r['target']}: "
              f"{r['status']}" + (f" ({r['error']})" if "error" in r else ""), file=sys.stderr)  # fmt: skip
    if args.json:
        import triton

        version = subprocess.run([str(_ptxas()), "--version"], capture_output=True, text=True).stdout.strip()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__,
                                         "ptxas": next((ln for ln in version.splitlines() if "release" in ln), version),
                                         "smem_limits": SMEM_LIMITS, "rows": rows}, indent=1) + "\n")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
