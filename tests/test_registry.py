import numpy as np
import pytest
import torch

from utils import REGISTRY, OfflineModelError, load_pipeline, resolve_model
from utils.models import hub_reachable


def test_tasks_and_real_checkpoints_on_maintained_mirrors():
    assert set(REGISTRY) == {"text-to-image", "image-to-image", "inpainting", "depth-to-image"}
    sources = {e.source for entries in REGISTRY.values() for e in entries.values() if not e.bundled}
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in sources
    assert not any(s.startswith(("runwayml/", "stabilityai/")) for s in sources)  # withdrawn


def test_auto_is_the_bundled_model_offline(monkeypatch):
    monkeypatch.delenv("COURSE_MODEL", raising=False)
    entry = resolve_model("text-to-image")
    assert entry.bundled and entry.source == "mini-sd"  # offline, even on a CUDA machine
    assert not hub_reachable()  # HF_HUB_OFFLINE=1 answers at once


def test_switch_by_argument_and_environment(monkeypatch):
    assert resolve_model("text-to-image", "real").source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    monkeypatch.setenv("COURSE_MODEL", "real")
    assert not resolve_model("text-to-image").bundled
    assert resolve_model("text-to-image", "mini").bundled  # the argument wins


def test_unknown_names_list_the_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match=r"valid tasks: \['text-to-image'"):
        resolve_model("text2video")
    with pytest.raises(ValueError, match=r"valid choices: \['auto', 'mini', 'real'\]"):
        resolve_model("text-to-image", "sdxl")
    monkeypatch.setenv("COURSE_MODEL", "bogus")
    with pytest.raises(ValueError, match="COURSE_MODEL"):
        resolve_model("text-to-image")


def test_every_task_has_a_bundled_model_and_auto_picks_it_offline(monkeypatch):
    monkeypatch.delenv("COURSE_MODEL", raising=False)
    expected = {"inpainting": ("mini-sd-inpainting", "StableDiffusionInpaintPipeline"),
                "depth-to-image": ("mini-sd-depth", "StableDiffusionDepth2ImgPipeline")}
    for task, (folder, pipeline) in expected.items():
        entry = resolve_model(task, "mini")
        assert entry.bundled and (entry.source, entry.pipeline) == (folder, pipeline)
        assert resolve_model(task) == entry  # "auto" offline, even on a CUDA machine
    assert resolve_model("inpainting", "real").source == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    assert resolve_model("depth-to-image", "real").source.startswith("sd2-community/")


def test_missing_bundled_folder_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("utils.models.MODELS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="bundled model is missing.*build_mini_tasks.py"):
        load_pipeline("inpainting", model="mini", device="cpu")
    with pytest.raises(FileNotFoundError, match="bundled model is missing.*build_mini_sd.py"):
        load_pipeline("text-to-image", model="mini", device="cpu")


def test_hub_model_offline_names_the_bundled_alternative(tmp_path):
    # an empty cache: nothing downloaded, and HF_HUB_OFFLINE=1 (conftest) forbids downloading
    with pytest.raises(OfflineModelError, match="model='mini'"):
        load_pipeline("text-to-image", model="real", device="cpu", cache_dir=tmp_path)
    for task in ("inpainting", "depth-to-image"):
        with pytest.raises(OfflineModelError, match=f"load_pipeline\\('{task}', model='mini'\\)"):
            load_pipeline(task, model="real", device="cpu", cache_dir=tmp_path)


def test_load_bundled_pipeline_by_task():
    pipe = load_pipeline("image-to-image", model="mini", device="cpu")
    assert type(pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"


def test_bundled_inpainting_and_depth_pipelines_run():
    """The bundled task models load with diffusers' own classes, offline, in float32, and draw."""
    from PIL import Image

    from utils.seeding import make_generator

    image = Image.new("RGB", (64, 64), (240, 220, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for task, cls, channels, extra in (
        ("inpainting", "StableDiffusionInpaintPipeline", 9, dict(mask_image=mask)),
        ("depth-to-image", "StableDiffusionDepth2ImgPipeline", 5, dict(strength=0.8)),
    ):
        pipe = load_pipeline(task, model="mini", device="cpu")
        assert type(pipe).__name__ == cls and pipe.unet.config.in_channels == channels
        assert pipe.unet.dtype == torch.float32
        out = pipe("a red circle", image=image, num_inference_steps=3, generator=make_generator(0),
                   output_type="np", **extra).images
        assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
