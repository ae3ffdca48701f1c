"""The build script's smoke mode rebuilds every stage into a temporary folder, and the result
loads with diffusers and goes through the evaluation script."""

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                    reason="open_clip_torch not installed (scripts/setup.sh --dev installs it)")
def test_smoke_build_then_evaluate(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    models = tmp_path / "models"
    build = subprocess.run(
        [sys.executable, "scripts/build_mini_sd.py", "--smoke", "--out", str(models),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    for part in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
        assert (models / "mini-sd" / part).is_dir(), part
    assert (models / "mini-clip" / "model.safetensors").exists()
    scheduler_config = (models / "mini-sd" / "scheduler" / "scheduler_config.json").read_text()
    assert '"clip_sample": false' in scheduler_config
    assert "resumed" not in build.stdout

    # a second run finds every stage done and rebuilds nothing
    again = subprocess.run(
        [sys.executable, "scripts/build_mini_sd.py", "--smoke", "--out", str(models),
         "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0 and "UNet (EMA weights) saved" not in again.stdout

    evaluate = subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--models", str(models), "--prompts", "4",
         "--images", "20", "--no-save"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    for line in ("prompts.all", "vae.psnr", "clip.colour", "speed.seconds_per_image"):
        assert line in evaluate.stdout
