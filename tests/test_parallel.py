"""Several processes, one video: CFG-parallel and Ulysses runs on 2 and 4 CPU processes (gloo) against the
single-process run of the same seed, and the errors of a misconfigured group, on every rank, without a hang.

Each spawn runs many cases in one process group (each spawned process imports torch: on a 2-core machine
that is most of a spawn's time). The tiny checkpoints have 2 or 3 heads and, at 48x80 pixels and 9 frames,
3 x 3 x 5 = 45 video tokens: an odd count, so every Ulysses shard layout here pads its last shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cogvx.engine import Engine
from helpers import rel_l2, where_differs
from parallel_worker import generate_kwargs, spawn_ranks

TOL = 1e-5  # relative L2, fp32
T2V = dict(prompt="a fox in the snow", negative_prompt="blurry", num_frames=9, height=48, width=80,
           num_inference_steps=3, guidance_scale=6.0, seed=5)
I2V = dict(T2V, prompt="a boat", negative_prompt=None)
LAYERS = 2  # every tiny test checkpoint


def _case(name, ckpt, parallel, generate=T2V, **extra) -> dict:
    return dict(name=name, ckpt=str(ckpt), load=dict(parallel=parallel, **extra.pop("load", {})),
                generate=dict(generate), **extra)


def _read(out, name: str, rank: int) -> tuple[dict, dict]:
    record = json.loads((out / f"{name}.rank{rank}.json").read_text())
    path = out / f"{name}.rank{rank}.safetensors"
    return record, (load_file(str(path)) if path.exists() else {})


_REFS: dict = {}


def _reference(case: dict) -> dict:
    """The single-process run of a case (same checkpoint, arguments and seed; no parallel)."""
    key = json.dumps({k: case[k] for k in ("ckpt", "load", "generate", "image", "tiling") if k in case},
                     sort_keys=True)
    if key not in _REFS:
        load = {k: v for k, v in case["load"].items() if k != "parallel"}
        engine = Engine.load(case["ckpt"], **load)
        if case.get("tiling"):
            th, tw = case["tiling"]
            engine.vae.enable_tiling(tile_sample_min_height=th, tile_sample_min_width=tw)
        r = engine.generate(**generate_kwargs(case))
        frames = None if r.frames is None else torch.as_tensor(r.frames)
        _REFS[key] = dict(latents=r.latents.float(), frames=frames, seed=r.seed)
    return _REFS[key]


def _check_matches(out, case: dict, world: int, tol: float = TOL) -> None:
    ref = _reference(case)
    for rank in range(world):
        record, got = _read(out, case["name"], rank)
        assert record["error"] is None, f"{case['name']} rank {rank}: {record['error']}"
        err = rel_l2(got["latents"], ref["latents"])
        assert err <= tol, f"{case['name']} rank {rank} latents: rel L2 {err:.2e} at " \
                           f"{where_differs(got['latents'], ref['latents'])}"
        if rank == 0:
            err = rel_l2(got["frames"], ref["frames"])
            assert err <= tol, f"{case['name']} frames: rel L2 {err:.2e}"
        else:
            assert "frames" not in got, "only rank 0 decodes"


def _check_error(out, name: str, world: int, *needles: str) -> None:
    for rank in range(world):
        record, _ = _read(out, name, rank)
        assert record["error"] is not None, f"{name}: rank {rank} raised nothing"
        for n in needles:
            assert n in record["error"], f"{name} rank {rank}: {n!r} not in {record['error']!r}"


# ---------------------------------------------------------------- 2 processes
def _two_rank_cases(ckpt_factory, tmp) -> list[dict]:
    rope, sincos = ckpt_factory("rope"), ckpt_factory("sincos", "CogVideoXDPMScheduler")
    learned, v15 = ckpt_factory("learned"), ckpt_factory("v15_ofs", "CogVideoXDPMScheduler")
    linked = tmp / "rope-link"
    linked.symlink_to(rope, target_is_directory=True)
    return [
        _case("rope-cfg", rope, "cfg", save=True),
        _case("rope-ulysses", rope, "ulysses"),  # 3 heads: 2 + 1
        _case("rope-cfg+ulysses", rope, "cfg+ulysses"),
        _case("sincos-cfg", sincos, "cfg"),  # DPM draws noise every step, on every rank
        _case("sincos-ulysses", sincos, "ulysses"),
        _case("learned-i2v-ulysses", learned, "ulysses", I2V, image=[48, 80]),
        _case("learned-i2v-cfg", learned, "cfg", I2V, image=[48, 80]),
        # 1.5 I2V: 17 frames -> 5 latent frames + 1 padding -> 3 x 3 x 5 tokens
        _case("v15-i2v-ulysses", v15, "ulysses", dict(I2V, num_frames=17), image=[48, 80]),
        _case("rope-ulysses-tiles", rope, "ulysses", tiling=[32, 32]),  # 8 VAE tiles over 2 ranks
        _case("rope-ulysses-unseeded", rope, "ulysses", dict(T2V, seed=None)),
        # the Triton kernels (interpreted on the CPU: slow, so one step over 16 text tokens)
        _case("rope-ulysses-triton", rope, "ulysses", dict(T2V, num_inference_steps=1, max_sequence_length=16),
              load=dict(kernels="triton")),
        _case("rope-ulysses-int8wo", rope, "ulysses", load=dict(recipe="int8wo")),  # against int8wo on one process
        _case("rope-ulysses-no-guidance", rope, "ulysses", dict(T2V, guidance_scale=1.0)),
        _case("rope-cfg-2-prompts", rope, "cfg",
              dict(T2V, prompt=["a fox", "a cat"], negative_prompt=["dark", "blurry"])),
        # bad input: each must raise on every rank, and the group carries on with the next case
        _case("bad-cfg-no-guidance", rope, "cfg", dict(T2V, guidance_scale=1.0)),
        _case("bad-seed-disagrees", rope, "ulysses", rank_overrides={"1": {"generate": {"seed": 6}}}),
        _case("bad-load-disagrees", rope, "ulysses", rank_overrides={"1": {"load": {"kernels": "torch"}}}),
        _case("bad-model-missing-on-rank-1", rope, "ulysses", rank_overrides={"1": {"ckpt": str(rope) + "-missing"}}),
        # the same checkpoint by another path on rank 1 is the same model
        _case("rope-other-path", rope, "ulysses", rank_overrides={"1": {"ckpt": str(linked)}}),
        dict(name="raise-together", kind="raise_together"),
        _case("after-errors", rope, "cfg+ulysses"),
        # last, so no case before it runs compiled (test_compiled_parallel_generate_has_no_graph_break)
        _case("compiled", rope, "ulysses", dict(T2V, output_type="latent"), repeat=True,
              load=dict(compile=True, compile_backend="aot_eager", compile_cache_dir=str(tmp / "cache"))),
    ]


@pytest.fixture(scope="module")
def two_ranks(ckpt_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    cases = _two_rank_cases(ckpt_factory, out)
    spawn_ranks(2, dict(cases=cases), out, timeout=600)
    return out, {c["name"]: c for c in cases}


MATCH_2 = ["rope-cfg", "rope-ulysses", "rope-cfg+ulysses", "sincos-cfg", "sincos-ulysses", "learned-i2v-ulysses",
           "learned-i2v-cfg", "v15-i2v-ulysses", "rope-ulysses-tiles", "rope-ulysses-triton", "after-errors",
           "rope-ulysses-no-guidance", "rope-cfg-2-prompts", "rope-other-path", "rope-ulysses-int8wo"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MATCH_2)
def test_two_processes_match_one(two_ranks, name):
    out, cases = two_ranks
    _check_matches(out, cases[name], 2)


@pytest.mark.slow
def test_a_seed_drawn_at_random_is_shared(two_ranks):
    out, cases = two_ranks
    recs = [_read(out, "rope-ulysses-unseeded", r) for r in range(2)]
    seeds = {rec["seed"] for rec, _ in recs}
    assert len(seeds) == 1 and None not in seeds
    case = dict(cases["rope-ulysses-unseeded"], generate=dict(T2V, seed=seeds.pop()))
    ref = _reference(case)
    for rec, got in recs:
        assert rel_l2(got["latents"], ref["latents"]) <= TOL


@pytest.mark.slow
def test_bad_input_raises_on_every_rank(two_ranks):
    out, _ = two_ranks
    _check_error(out, "bad-cfg-no-guidance", 2, "guidance_scale=1.0", "parallel='ulysses'")
    _check_error(out, "bad-seed-disagrees", 2, "disagree", "seed (rank 1 differs from rank 0)")
    _check_error(out, "bad-load-disagrees", 2, "Engine.load", "kernels (rank 1 differs from rank 0)")
    _check_error(out, "bad-model-missing-on-rank-1", 2, "Engine.load", "model (rank 1 differs from rank 0)")
    # a check that fails on one rank only stops every rank, with that rank's message
    assert _read(out, "raise-together", 1)[0]["error"] == "ValueError: no such file on this node"
    assert _read(out, "raise-together", 0)[0]["error"] == "ValueError: the test failed on rank 1 of the process " \
        "group, so it stops on every rank: ValueError: no such file on this node"


@pytest.mark.slow
def test_profile_reports_every_rank_and_the_collectives(two_ranks):
    out, cases = two_ranks
    steps = T2V["num_inference_steps"]
    for name, per_step in (("rope-ulysses", 2 * LAYERS + 1), ("rope-cfg", 1)):
        for rank in range(2):
            p = _read(out, name, rank)[0]["parallel"]
            assert (p["rank"], p["world"], p["collective_timing"]) == (rank, 2, "measured")
            assert p["collective_calls"] == steps * per_step
            assert 0 < p["collective_seconds"] < p["ranks"][rank]["stages"]["denoise"]
            assert [r["rank"] for r in p["ranks"]] == [0, 1]
            assert all(r["stages"]["denoise"] > 0 and r["step_median_seconds"] > 0 for r in p["ranks"])
    # the collectives a compiled forward's profile replays are the ones an eager forward makes
    for name in ("rope-ulysses", "rope-cfg", "rope-cfg+ulysses", "sincos-ulysses", "v15-i2v-ulysses"):
        assert all(_read(out, name, r)[0]["calls_as_replayed"] for r in range(2)), name
    # rank 0 decodes and writes; the other rank's save writes nothing
    rec0, rec1 = (_read(out, "rope-cfg", r)[0] for r in range(2))
    assert len(rec0["saved"]) == 1 and rec1["saved"] == []
    assert rec0["parallel"]["ranks"][0]["stages"]["vae_decode"] > 0


# ---------------------------------------------------------------- 4 processes
@pytest.fixture(scope="module")
def four_ranks(ckpt_factory, tmp_path_factory):
    rope, sincos, learned = ckpt_factory("rope"), ckpt_factory("sincos"), ckpt_factory("learned")
    short = dict(T2V, num_inference_steps=2)
    cases = [
        # 2 x 2, two prompts: the gathered predictions come back in [uncond; cond] x prompt order
        _case("rope-cfg+ulysses", rope, "cfg+ulysses", dict(short, prompt=["a fox", "a cat"], negative_prompt=None)),
        _case("rope-ulysses", rope, "ulysses", short),  # 4 shards of 12 rows (3 padded); 3 heads: one idle
        _case("sincos-ulysses", sincos, "ulysses", short),
        _case("learned-i2v-cfg+ulysses", learned, "cfg+ulysses", dict(I2V, num_inference_steps=2), image=[48, 80]),
        _case("bad-cfg-on-4", rope, "cfg", short),
    ]
    out = tmp_path_factory.mktemp("four-ranks")
    spawn_ranks(4, dict(cases=cases), out, timeout=900)
    return out, {c["name"]: c for c in cases}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rope-cfg+ulysses", "rope-ulysses", "sincos-ulysses", "learned-i2v-cfg+ulysses"])
def test_four_processes_match_one(four_ranks, name):
    out, cases = four_ranks
    _check_matches(out, cases[name], 4)


@pytest.mark.slow
def test_cfg_on_four_processes_is_refused_on_every_rank(four_ranks):
    out, _ = four_ranks
    _check_error(out, "bad-cfg-on-4", 4, "2 processes", "cfg+ulysses")


# ---------------------------------------------------------------- compile
@pytest.mark.slow
def test_compiled_parallel_generate_has_no_graph_break(two_ranks):
    """Ulysses on 2 processes, compiled: the all-to-alls and the all-gather are functional collectives
    inside one graph (no break), the second generate of the shape compiles nothing, and the result is the
    eager single-process one. Graph breaks and recompiles are dynamo's (the backend only turns a graph into
    code), so this runs aot_eager: inductor's compile of the same graph on each rank cost 30 s of the suite,
    and its numerics are the single-process compile tests'. The case is the last of the two-rank spawn
    (one process group fewer to start), after every eager case."""
    out, cases = two_ranks
    case = cases["compiled"]
    ref = _reference(dict(case, load={}))
    for rank in range(2):
        rec, got = _read(out, "compiled", rank)
        assert rec["error"] is None, rec["error"]
        assert rec["first"]["graph_breaks"] == rec["before"]["graph_breaks"] == 0
        assert rec["first"]["unique_graphs"] - rec["before"]["unique_graphs"] == 1
        assert rec["after"] == rec["first"], "the second generate of the same shape recompiled"
        assert "compile" not in rec["stages"]
        p = rec["parallel"]
        assert p["collective_timing"] == "replayed" and p["collective_calls"] == 3 * (2 * LAYERS + 1)
        assert p["collective_seconds"] > 0
        assert rel_l2(got["latents"], ref["latents"]) <= 1e-4


# ---------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_cli_generates_on_two_processes(ckpt_factory, tmp_path):
    """``torchrun --nproc-per-node 2 -m cogvx.engine.cli generate --parallel ulysses``: the CLI starts the
    gloo group from torchrun's environment, rank 0 alone writes the video and prints, the profile lists
    both ranks."""
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "cogvx.engine.cli",
           "generate", "--model", str(ckpt_factory("rope")), "--prompt", "a fox", "--frames", "9", "--height", "48",
           "--width", "80", "--steps", "2", "--seed", "3", "--parallel", "ulysses", "--profile", "--out", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert out.is_file() and r.stdout.count("wrote ") == 1
    assert "parallel ulysses on 2 ranks" in r.stdout and "rank 1" in r.stdout
