"""``cogvx eval`` on the make-tiny checkpoint: the report and the contact sheet; goldens recorded by one
run pass when compared with the same recipe and fail, with the figures, against another recipe."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cogvx.engine.cli import main
from cogvx.engine.pipelines.evaluate import read_goldens
from cogvx.quantize.metrics import psnr

SMALL = ["--frames", "9", "--height", "32", "--width", "48", "--steps", "2", "--seeds", "0", "3"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    assert main(["make-tiny", "--out", str(d / "tiny")]) == 0
    (d / "prompts.txt").write_text("# one prompt a line\na lighthouse at dusk\n\n")
    rc = main(["eval", "--model", str(d / "tiny"), "--recipe", "int8wo", "--prompts", str(d / "prompts.txt"), *SMALL,
               "--out", str(d / "report"), "--record", str(d / "goldens")])
    assert rc == 0
    return d


def test_report_and_contact_sheet(recorded):
    report = json.loads((recorded / "report" / "report.json").read_text())
    assert report["recipe"] == "int8wo" and report["reference"] == "fp32"
    rows = report["vs_reference"]["videos"]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a lighthouse at dusk", 0), ("a lighthouse at dusk", 3)]
    for r in rows:  # int8 weight-only on the tiny model: close to, but not equal to, fp32
        assert 50 < r["psnr_db"] < 150 and 0.99 < r["ssim"] <= 1 and 40 < r["latent_sqnr_db"] < 150
    sheet = Image.open(recorded / "report" / "contact_sheet.png")
    assert sheet.format == "PNG" and sheet.height > 2 * 128 and sheet.width > 4 * 2 * 128 * 48 / 32
    settings, doc, runs = read_goldens(recorded / "goldens")
    assert doc["recipe"] == "int8wo" and settings.seeds == [0, 3] and runs[0].frames.shape == (9, 32, 48, 3)
    assert abs(psnr(runs[0].frames, runs[1].frames) - rows[0]["psnr_db"]) > 1  # two seeds, two videos


def test_same_recipe_passes_against_its_goldens(recorded, capsys):
    rc = main(["eval", "--model", str(recorded / "tiny"), "--recipe", "int8wo", "--reference", "none",
               "--compare", str(recorded / "goldens"), "--out", str(recorded / "same")])
    assert rc == 0
    part = json.loads((recorded / "same" / "report.json").read_text())["vs_goldens"]
    assert part["passed"] and all(r["psnr_db"] is None for r in part["videos"])  # identical on one machine
    assert "passed" in capsys.readouterr().out


def test_another_recipe_fails_against_the_goldens_with_the_figures(recorded, capsys):
    rc = main(["eval", "--model", str(recorded / "tiny"), "--recipe", "fp8wo", "--reference", "none",
               "--compare", str(recorded / "goldens"), "--out", str(recorded / "other")])
    assert rc == 1
    part = json.loads((recorded / "other" / "report.json").read_text())["vs_goldens"]
    assert not part["passed"] and part["recorded_recipe"] == "int8wo"
    worst = part["failures"][0]
    assert worst["psnr_db"] < 70 and "psnr_db" in worst["failed"]
    err = capsys.readouterr().err
    assert "FAILED" in err and f"psnr_db {worst['psnr_db']:.1f} < 70" in err


@pytest.mark.parametrize("argv, message", [
    (["--steps", "3"], "recorded with num_inference_steps=2"),
    (["--recipe", "nope"], "unknown quantization recipe"),
])
def test_bad_comparisons_fail_before_generating(recorded, capsys, argv, message):
    args = ["eval", "--model", str(recorded / "tiny"), "--recipe", "int8wo", "--reference", "none",
            "--compare", str(recorded / "goldens"), "--out", str(recorded / "bad")]
    for i in range(0, len(argv), 2):
        if argv[i] in args:
            args[args.index(argv[i]) + 1] = argv[i + 1]
        else:
            args += argv[i:i + 2]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_reference_none_without_goldens_is_refused(recorded, capsys):
    assert main(["eval", "--model", str(recorded / "tiny"), "--recipe", "int8wo", "--reference", "none",
                 "--out", str(recorded / "x")]) == 2
    assert "measures nothing" in capsys.readouterr().err
