"""Full text-to-video pipeline on a GPU: real-shape CogVideoX-5b and -2b with random weights,
49 frames at 720x480, 50 steps, CFG; cogvx against diffusers' own pipeline on the same weights.

Configurations (each in its own process, so peaks do not mix), most important first:
  cogvx bf16 eager | diffusers bf16 eager | cogvx bf16 compiled | cogvx fp8dq-row compiled + Triton kernels |
  diffusers bf16 compiled | cogvx int8wo compiled | cogvx bf16 compiled + Triton kernels + 8-bit attention
Each runs a 1-step warm-up generate at the same shape without decoding (compiling where compiled;
reported as compile time) and then the timed generate, from prompt to decoded frames. Reported: wall
seconds (total and per stage), median step, peak CUDA memory (allocated and reserved), achieved TFLOP/s.

One command, within a time budget (default 25 minutes): every configuration gets the time left, a
configuration that fails or runs out of time is recorded with its error, and the ones that cannot
start in time are recorded as skipped. The results JSON is rewritten after every configuration, so a
run stopped half-way keeps what it measured.

    python benchmarks/gpu_pipeline.py                       # both models, every configuration
    python benchmarks/gpu_pipeline.py --models 5b --configs cogvx-fp8dq-row-compiled diffusers-eager
    python benchmarks/gpu_pipeline.py --smoke               # CPU check of every code path (tiny model)

--smoke: the tiny preset on the CPU, 2 steps, 9 frames at 32x32, in this process; compiled
configurations use torch.compile's "aot_eager" backend (the same fullgraph capture, no code
generation); configurations this machine cannot run (fp8 needs CUDA SM 8.9+) are recorded as skipped
with the reason. Writes benchmarks/results/pipeline-<device>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _util, also under `python -P`
from _util import child_result, git_commit, results_path, run_child  # noqa: E402

CONFIGS = {
    "cogvx-eager": dict(impl="cogvx", recipe=None, compile=False, kernels="auto"),
    "diffusers-eager": dict(impl="diffusers", compile=False),
    "cogvx-compiled": dict(impl="cogvx", recipe=None, compile=True, kernels="auto"),
    "cogvx-fp8dq-row-compiled": dict(impl="cogvx", recipe="fp8dq-row", compile=True, kernels="triton"),
    "diffusers-compiled": dict(impl="diffusers", compile=True),
    "cogvx-int8wo-compiled": dict(impl="cogvx", recipe="int8wo", compile=True, kernels="auto"),
    "cogvx-int8attn-compiled": dict(impl="cogvx", recipe=None, compile=True, kernels="triton", int8_attention=True),
}
PROMPT = "A panda, dressed in a small red jacket and a tiny hat, sits on a wooden stool in a bamboo forest."
FULL = dict(device="cuda", dtype="bfloat16", shape=dict(num_frames=49, height=480, width=720), steps=50,
            compile_backend="inductor")
SMOKE = dict(device="cpu", dtype="float32", shape=dict(num_frames=9, height=32, width=32), steps=2,
             compile_backend="aot_eager")
MARGIN_S = 30  # left for writing results after the last configuration


def _settings(smoke: bool, steps: int | None = None) -> dict:
    s = SMOKE if smoke else FULL
    return s if steps is None else dict(s, steps=steps)


def skip_reason(name: str, device: str) -> str | None:
    """Why configuration ``name`` cannot run on ``device`` (None when it can)."""
    from cogvx.quantize import availability

    recipe = CONFIGS[name].get("recipe")
    if recipe:
        ok, why = availability(recipe, device)
        if not ok:
            return f"recipe {recipe}: {why}"
    return None


def _child(model: str, name: str, smoke: bool, steps: int | None = None) -> dict:
    """Run one configuration in this process; returns its result row."""
    import torch

    from cogvx.engine import Engine

    s, c = _settings(smoke, steps), CONFIGS[name]
    dtype = getattr(torch, s["dtype"])
    if c["impl"] == "diffusers":
        return _diffusers(model, name, s, dtype)
    t0 = time.perf_counter()
    engine = Engine.from_preset(model, s["device"], dtype, recipe=c["recipe"], kernels=c["kernels"])
    if c.get("int8_attention"):  # the 8-bit attention without a weight recipe (fp8dq-row-int8attn has both)
        engine.transformer.set_int8_gpu_attention(True)
    if c["compile"]:
        engine.compile(True, backend=s["compile_backend"])
    load_s = time.perf_counter() - t0
    warm = engine.generate(PROMPT, **s["shape"], num_inference_steps=1, seed=0, output_type="latent")
    res = engine.generate(PROMPT, **s["shape"], num_inference_steps=s["steps"], seed=0)
    p = res.profile
    return dict(config=name, model=model, load_s=load_s, compile_s=warm.profile.stages.get("compile", 0.0),
                total_s=p.total_seconds, stages=p.stages, step_median_s=p.step_median, steps_s=p.steps,
                memory=p.memory, tflops=p.tflops, flops_per_step=p.flops_per_step, shape=p.shape,
                frames_shape=list(res.frames.shape))


def _diffusers(model: str, name: str, s: dict, dtype) -> dict:
    """diffusers' CogVideoXPipeline on the weights of the same random preset (same seed)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Tokenizer

    from cogvx.engine import Engine
    from cogvx.engine.dev.tiny_tokenizer import make_tiny_tokenizer
    from cogvx.engine.runtime.profiling import PeakMemory

    device, shape, steps = s["device"], s["shape"], s["steps"]
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
    with tempfile.TemporaryDirectory(prefix="cogvx-tok-") as tok_dir:  # the tokenizer cogvx's preset uses
        make_tiny_tokenizer(Path(tok_dir))
        tok = T5Tokenizer.from_pretrained(tok_dir)
    sched = CogVideoXDDIMScheduler(**engine.scheduler.config.to_dict())
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=engine.text_encoder, vae=vae.eval(), transformer=tr.eval(),
                             scheduler=sched)
    del engine
    if CONFIGS[name]["compile"]:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=s["compile_backend"])
    load_s = time.perf_counter() - t0

    def run(n: int, **kw):
        return pipe(PROMPT, **shape, num_inference_steps=n, guidance_scale=6.0,
                    generator=torch.Generator(device).manual_seed(0), **kw)

    t0 = time.perf_counter()
    run(1, output_type="latent")
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
        frames = run(steps, output_type="np", callback_on_step_end=on_step).frames
        total = time.perf_counter() - t0
    return dict(config=name, model=model, load_s=load_s, warmup_s=warm_s, total_s=total,
                step_median_s=statistics.median(step_times) if step_times else None, steps_s=step_times,
                memory=mem.result, frames_shape=list(frames.shape))


def _run_config(model: str, name: str, smoke: bool, in_process: bool, timeout: float, steps: int | None) -> dict:
    """One configuration's row: its results, or its error (a failure never stops the run)."""
    if in_process:
        try:
            import torch._dynamo

            torch._dynamo.reset()  # each configuration compiles afresh, as in its own process
            return _child(model, name, smoke, steps)
        except Exception as e:
            return dict(config=name, model=model, error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
    try:
        return run_child(__file__, model, name, *(["--smoke"] if smoke else []),
                         *(["--steps", str(steps)] if steps else []), timeout=timeout)
    except RuntimeError as e:  # the time budget, or the configuration failed
        return dict(config=name, model=model, error=str(e)[-2000:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["5b", "2b"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks every code path, fast")
    p.add_argument("--subprocess", action="store_true", help="with --smoke: each configuration in its own process "
                                                             "(always so without --smoke)")
    p.add_argument("--budget-min", type=float, default=25.0, help="time budget of the whole run in minutes")
    p.add_argument("--steps", type=int, help="denoising steps of the timed generate (default 50; 2 with --smoke)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_result(_child(args.child[0], args.child[1], args.smoke, args.steps))
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("this benchmark needs a CUDA device (use --smoke to check it on the CPU)", file=sys.stderr)
        return 2
    s = _settings(args.smoke, args.steps)
    deadline = time.monotonic() + args.budget_min * 60
    models = ["tiny"] if args.smoke and args.models == p.get_default("models") else args.models
    commit, dirty = git_commit()
    device = torch.cuda.get_device_name() if s["device"] == "cuda" else "cpu"
    meta = dict(benchmark="text_to_video_pipeline", device=device, dtype=s["dtype"], **s["shape"], steps=s["steps"],
                cfg=True, compile_backend=s["compile_backend"], commit=commit, dirty=dirty,
                date=time.strftime("%Y-%m-%d"), torch=torch.__version__, smoke=args.smoke,
                budget_min=args.budget_min)
    path = results_path("pipeline", device, commit, out=Path(args.out))
    rows: list[dict] = []

    def save() -> None:
        path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")

    for model in models:
        for name in args.configs:
            left = deadline - time.monotonic() - MARGIN_S
            why = skip_reason(name, s["device"])
            if why is None and left < 10:
                why = f"time budget of {args.budget_min:g} min spent"
            if why is not None:
                rows.append(dict(config=name, model=model, skipped=why))
                print(f"{model:5} {name:26} skipped: {why}", flush=True)
            else:
                rows.append(_run_config(model, name, args.smoke, args.smoke and not args.subprocess, left, args.steps))
                r = rows[-1]
                if "error" in r:
                    print(f"{model:5} {name:26} FAILED\n{r['error']}", file=sys.stderr, flush=True)
                else:
                    peak = max(r["memory"].values()) / 2**30 if r.get("memory") else float("nan")
                    print(f"{model:5} {name:26} total {r['total_s']:8.1f} s  step {r['step_median_s'] or 0:7.3f} s  "
                          f"peak {peak:6.1f} GiB", flush=True)
            save()
    save()
    print(f"wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
