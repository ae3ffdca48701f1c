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
    if not torch.cuda.is_available():
        assert entry.bundled and entry.source == "mini-sd"
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


def test_no_bundled_model_yet_is_a_clear_error():
    with pytest.raises(ValueError, match="no mini model for 'inpainting'"):
        resolve_model("inpainting", "mini")


def test_hub_model_offline_names_the_bundled_alternative(tmp_path):
    # an empty cache: nothing downloaded, and HF_HUB_OFFLINE=1 (conftest) forbids downloading
    with pytest.raises(OfflineModelError, match="model='mini'"):
        load_pipeline("text-to-image", model="real", device="cpu", cache_dir=tmp_path)
    with pytest.raises(OfflineModelError, match="no bundled model"):
        load_pipeline("inpainting", model="real", device="cpu", cache_dir=tmp_path)


def test_load_bundled_pipeline_by_task():
    pipe = load_pipeline("image-to-image", model="mini", device="cpu")
    assert type(pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
