"""Full text-to-video pipeline on a GPU: real-shape CogVideoX-2b and -5b with random weights,
49 frames at 720x480, 50 steps, CFG; cogvx against diffusers' own pipeline on the same weights.

Configurations (each in its own process, so peaks do not mix):
  cogvx bf16 eager | cogvx bf16 compiled | cogvx int8wo compiled |
  cogvx fp8dq-row compiled + Triton kernels | diffusers bf16 eager | diffusers bf16 compiled
Each runs one warm-up generate of 2 steps at the same shape (compiling where compiled; reported as
compile time) and then the timed generate, from prompt to decoded frames. Reported: wall seconds
(total and per stage), median step, peak CUDA memory (allocated and reserved), achieved TFLOP/s.

    python benchmarks/gpu_pipeline.py                       # both models, every configuration
    python benchmarks/gpu_pipeline.py --models 5b --configs cogvx-fp8dq-row-compiled diffusers-eager
    python benchmarks/gpu_pipeline.py --smoke               # CPU check of the code paths (tiny model)

Writes benchmarks/results/pipeline-<device>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _util import child_result, git_commit, results_path, run_child  # benchmarks/ is sys.path[0]

CONFIGS = {
    "cogvx-eager": dict(impl="cogvx", recipe=None, compile=False, kernels="auto"),
    "cogvx-compiled": dict(impl="cogvx", recipe=None, compile=True, kernels="auto"),
    "cogvx-int8wo-compiled": dict(impl="cogvx", recipe="int8wo", compile=True, kernels="auto"),
    "cogvx-fp8dq-row-compiled": dict(impl="cogvx", recipe="fp8dq-row", compile=True, kernels="triton"),
    "diffusers-eager": dict(impl="diffusers", compile=False),
    "diffusers-compiled": dict(impl="diffusers", compile=True),
}
PROMPT = "A panda, dressed in a small red jacket and a tiny hat, sits on a wooden stool in a bamboo forest."


def _child(model: str, name: str, smoke: bool) -> dict:
    import torch

    from cogvx.engine import Engine

    c = CONFIGS[name]
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    shape = dict(num_frames=9, height=48, width=64) if smoke else dict(num_frames=49, height=480, width=720)
    steps = 2 if smoke else 50
    if c["impl"] == "diffusers":
        return _diffusers(model, c, device, dtype, shape, steps)
    t0 = time.perf_counter()
    engine = Engine.from_preset(model, device, dtype, recipe=c["recipe"], kernels=c["kernels"], compile=c["compile"])
    load_s = time.perf_counter() - t0
    warm = engine.generate(PROMPT, **shape, num_inference_steps=2, seed=0)
    res = engine.generate(PROMPT, **shape, num_inference_steps=steps, seed=0)
    p = res.profile
    return dict(config=name, model=model, load_s=load_s, compile_s=warm.profile.stages.get("compile", 0.0),
                total_s=p.total_seconds, stages=p.stages, step_median_s=p.step_median, steps_s=p.steps,
                memory=p.memory, tflops=p.tflops, flops_per_step=p.flops_per_step, shape=p.shape)


def _diffusers(model: str, c: dict, device: str, dtype, shape: dict, steps: int) -> dict:
    """diffusers' CogVideoXPipeline on the weights of the same random preset (same seed)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Tokenizer

    from cogvx.engine import Engine
    from cogvx.engine.runtime.profiling import PeakMemory

    t0 = time.perf_counter()
    engine = Engine.from_preset(model, device, dtype)
    cfg = {k: v for k, v in engine.config.to_dict().items() if not k.startswith("_")}
    # Built on the device (not meta): the 2b sin-cos table is a non-persistent buffer made in __init__.
    with torch.device(device):
        tr = CogVideoXTransformer3DModel(**cfg).to(dtype)
        vae = AutoencoderKLCogVideoX(**{k: v for k, v in engine.vae.config.to_dict().items()
                                        if not k.startswith("_")}).to(dtype)
    tr.load_state_dict(engine.transformer.state_dict())
    vae.load_state_dict(engine.vae.state_dict())
    engine.transformer, engine.vae = None, None  # their weights now live in the diffusers modules
    tok = T5Tokenizer.from_pretrained(str(engine.tokenizer.source.parent))
    sched = CogVideoXDDIMScheduler(**engine.scheduler.config.to_dict())
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=engine.text_encoder, vae=vae.eval(), transformer=tr.eval(),
                             scheduler=sched)
    del engine
    if c["compile"]:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    load_s = time.perf_counter() - t0
    gen = lambda n: pipe(PROMPT, **shape, num_inference_steps=n, guidance_scale=6.0,  # noqa: E731
                         generator=torch.Generator(device).manual_seed(0), output_type="np")
    t0 = time.perf_counter()
    gen(2)
    warm_s = time.perf_counter() - t0
    step_times, last = [], [None]

    def on_step(p, i, t, kw):
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if last[0] is not None:
            step_times.append(now - last[0])
        last[0] = now
        return {}

    with PeakMemory(torch.device(device)) as mem:
        t0 = time.perf_counter()
        pipe(PROMPT, **shape, num_inference_steps=steps, guidance_scale=6.0, output_type="np",
             generator=torch.Generator(device).manual_seed(0), callback_on_step_end=on_step)
        total = time.perf_counter() - t0
    return dict(config=f"diffusers-{'compiled' if c['compile'] else 'eager'}", model=model, load_s=load_s,
                warmup_s=warm_s, total_s=total, step_median_s=statistics.median(step_times) if step_times else None,
                steps_s=step_times, memory=mem.result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["2b", "5b"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the code paths only")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_result(_child(args.child[0], args.child[1], args.smoke))
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("this benchmark needs a CUDA device (use --smoke to check it on the CPU)", file=sys.stderr)
        return 2
    models = ["tiny"] if args.smoke else args.models
    configs = [c for c in args.configs if not (args.smoke and "fp8" in c)]  # fp8 needs CUDA SM 8.9+
    rows = []
    for model in models:
        for name in configs:
            try:
                rows.append(run_child(__file__, model, name, *(["--smoke"] if args.smoke else [])))
            except RuntimeError as e:
                rows.append(dict(config=name, model=model, error=str(e)[-2000:]))
                print(f"{model} {name}: FAILED\n{rows[-1]['error']}", file=sys.stderr)
                continue
            r = rows[-1]
            peak = max(r["memory"].values()) / 2**30 if r.get("memory") else float("nan")
            print(f"{model:4} {name:26} total {r['total_s']:8.1f} s  step {r['step_median_s'] or 0:7.3f} s  "
                  f"peak {peak:6.1f} GiB", flush=True)
    commit, dirty = git_commit()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    meta = dict(benchmark="text_to_video_pipeline", device=device, dtype="float32" if args.smoke else "bfloat16",
                frames=9 if args.smoke else 49, size="64x48" if args.smoke else "720x480",
                steps=2 if args.smoke else 50, cfg=True, commit=commit, dirty=dirty, date=time.strftime("%Y-%m-%d"),
                torch=torch.__version__, smoke=args.smoke)
    path = results_path("pipeline", device, commit, out=Path(args.out))
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
