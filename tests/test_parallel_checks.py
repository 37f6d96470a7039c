"""The parallel modes' checks and pieces that need no second process: no process group, a world size that
does not fit, the CLI outside torchrun, the shard layout, argument digests, the tile assignment and the
profile table. (Runs on 2 and 4 processes: tests/test_parallel.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from cogvx.engine import Engine
from cogvx.engine.cli import main
from cogvx.engine.parallel.decode import assign_tiles
from cogvx.engine.parallel.fingerprint import digest
from cogvx.engine.parallel.sharding import SeqLayout, head_groups, shard_tokens
from cogvx.engine.runtime.profiling import Profile
from helpers import rel_l2

KW = dict(prompt="a fox", num_frames=9, height=48, width=80, num_inference_steps=2, seed=1, output_type="latent")


@pytest.mark.parametrize("mode", ["cfg", "ulysses", "cfg+ulysses"])
def test_a_parallel_mode_needs_a_process_group(ckpt_factory, mode):
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="initialized torch.distributed process group.*torchrun"):
        Engine.load(ckpt_factory("rope"), parallel=mode)
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        Engine.from_preset("tiny", parallel=mode)


def test_an_unknown_parallel_mode_is_refused(ckpt_factory):
    with pytest.raises(ValueError, match=r"parallel must be None, 'cfg', 'ulysses', 'cfg\+ulysses' \(got 'ring'\)"):
        Engine.load(ckpt_factory("rope"), parallel="ring")


def test_cli_parallel_outside_torchrun_is_one_clear_line(ckpt_factory, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc = main(["generate", "--model", str(ckpt_factory("rope")), "--prompt", "x", "--parallel", "cfg",
               "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "torchrun --nproc-per-node N -m cogvx.engine.cli generate --parallel cfg" in err
    assert not (tmp_path / "v.mp4").exists()


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_sizes_that_do_not_fit_the_mode(ckpt_factory, one_process_group):
    with pytest.raises(ValueError, match="on 2 processes, but the process group has 1"):
        Engine.load(ckpt_factory("rope"), parallel="cfg")
    with pytest.raises(ValueError, match="even world size .* has 1 processes"):
        Engine.load(ckpt_factory("rope"), parallel="cfg+ulysses")
    # Ulysses on one process: the parallel forward with nothing to exchange is the plain one.
    got = Engine.load(ckpt_factory("rope"), parallel="ulysses").generate(**KW)
    ref = Engine.load(ckpt_factory("rope")).generate(**KW)
    assert rel_l2(got.latents, ref.latents) <= 1e-6
    assert got.profile.parallel["world"] == 1 and got.profile.parallel["collective_calls"] == 0


def test_head_groups_and_the_shard_layout():
    assert head_groups(30, 4) == [8, 8, 7, 7] and head_groups(48, 4) == [12] * 4 and head_groups(3, 4) == [1, 1, 1, 0]
    lay = SeqLayout(n_text=226, n_video=45, size=4, rank=3)
    assert (lay.chunk, lay.pad, lay.rows) == (12, 3, 238)
    x = torch.randn(2, 226 + 45, 8)
    shard = shard_tokens(x, lay)
    assert shard.shape == (2, 238, 8)
    assert torch.equal(shard[:, :226], x[:, :226])  # text on every rank
    assert torch.equal(shard[:, 226:235], x[:, 226 + 36:])  # the last 9 video rows
    assert torch.equal(shard[:, 235:], torch.zeros(2, 3, 8))  # padding
    shards = [shard_tokens(x, SeqLayout(226, 45, 4, r))[:, 226:] for r in range(4)]
    assert torch.equal(torch.cat(shards, dim=1)[:, :45], x[:, 226:])


def test_argument_digests_tell_values_apart():
    t = torch.arange(6.0).view(2, 3)
    assert digest(t) == digest(t.clone()) and digest(t) != digest(t.view(3, 2)) and digest(t) != digest(t.double())
    u = t.clone()
    u[1, 2] += 1e-6
    assert digest(u) != digest(t)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert digest(g1) == digest(g2)
    torch.randn(1, generator=g2)
    assert digest(g1) != digest(g2)
    a = np.zeros((4, 4, 3), np.uint8)
    assert digest(a) == digest(a.copy()) != digest(a + 1)
    assert digest(Image.fromarray(a)) != digest(Image.fromarray(a + 1))
    assert digest(dict(p="x", s=[1, 2])) != digest(dict(p="x", s=[1, 3]))
    assert digest(lambda: 1) == digest(print)  # callbacks may differ per rank
    assert digest(1) != digest(1.0) != digest("1")


def test_tiles_are_shared_out_by_area():
    owned = assign_tiles([720, 720, 288, 600, 600, 240], 2)
    assert sorted(k for o in owned for k in o) == list(range(6))
    loads = [sum([720, 720, 288, 600, 600, 240][k] for k in o) for o in owned]
    assert max(loads) == 1608 and 0 in owned[0]
    assert assign_tiles([5], 4) == [[0], [], [], []]


def test_profile_table_shows_each_rank():
    ranks = [dict(rank=r, stages={"denoise": 1.0 + r}, step_median_seconds=0.5, collective_seconds=0.1, seconds=2.0)
             for r in range(2)]
    p = Profile(device="cpu", dtype="float32", steps=[0.5, 0.5], parallel=dict(
        mode="ulysses", world=2, rank=0, collective_seconds=0.1, collective_timing="measured", collective_calls=10,
        collective_bytes=2**20, ranks=ranks))
    table = p.table()
    assert "parallel ulysses on 2 ranks" in table and "collectives" in table
    assert "rank 1" in table and "denoise 2.000" in table
    assert '"ranks"' in p.to_json()
