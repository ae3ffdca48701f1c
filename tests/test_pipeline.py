"""The bundled mini Stable Diffusion, loaded and run exactly as a learner would."""

import logging

import numpy as np
import pytest
import torch

from tests.conftest import MINI_CLIP, MINI_SD
from utils import make_generator


def _generate(pipe, prompt="a red star in the top left", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 5)
    return pipe(prompt, generator=make_generator(seed), **kwargs).images[0]


def test_loads_offline_in_float32_with_sd_classes(mini_pipe):
    assert type(mini_pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(mini_pipe.vae).__name__ == "AutoencoderKL"
    assert type(mini_pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(mini_pipe.scheduler).__name__ == "PNDMScheduler"
    for module in (mini_pipe.unet, mini_pipe.vae, mini_pipe.text_encoder):
        assert module.dtype == torch.float32
    cfg = mini_pipe.scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (
        1000, 0.00085, 0.012, "scaled_linear")
    assert mini_pipe.vae_scale_factor == 8 and mini_pipe.vae.config.latent_channels == 4
    assert mini_pipe.text_encoder.config.max_position_embeddings == 77
    assert len(mini_pipe.tokenizer) == 49408


def test_schedulers_built_from_its_config_do_not_clip_latents(mini_pipe):
    # SD 1.5's scheduler config says clip_sample: false; without it DDIM's default (True) clips
    # the predicted latents to [-1, 1] and the pictures lose their objects
    from diffusers import DDIMScheduler

    assert mini_pipe.scheduler.config.clip_sample is False
    assert DDIMScheduler.from_config(mini_pipe.scheduler.config).config.clip_sample is False


def test_autopipeline_loads_it_too():
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(MINI_SD)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.text_encoder.dtype == torch.float32


def test_weights_are_safetensors_only_and_small():
    files = [p for p in MINI_SD.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    total = sum(p.stat().st_size for p in files) / 2**20
    assert total <= 40, f"models/mini-sd is {total:.1f} MB, over the 40 MB budget"
    assert (MINI_CLIP / "model.safetensors").exists()


def test_same_seed_same_image_other_seed_other_image(mini_pipe):
    a, b, c = _generate(mini_pipe), _generate(mini_pipe), _generate(mini_pipe, seed=1)
    assert a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_size_not_multiple_of_8_is_a_clear_error(mini_pipe):
    with pytest.raises(ValueError, match="divisible by 8"):
        _generate(mini_pipe, height=60, width=64)


def test_height_without_width_falls_back_to_the_default_size(mini_pipe):
    # documented diffusers behaviour (0.42): unless both height and width are given, both are
    # reset to the model's default, so a lone height is ignored: always pass both
    assert _generate(mini_pipe, height=32, num_inference_steps=2).size == (64, 64)
    assert _generate(mini_pipe, height=32, width=48, num_inference_steps=2).size == (48, 32)


def test_empty_prompt_is_the_unconditional_prompt(mini_pipe):
    # documented behaviour: "" is what classifier-free guidance uses as the unconditional prompt,
    # so an empty prompt is valid and gives an image from the model's unconditional distribution
    # with guidance, the "text" and the "unconditional" halves then get the same embeddings, so
    # eps_uncond + w (eps_text - eps_uncond) = eps_uncond for every w: the same image as w = 1
    unguided = np.asarray(_generate(mini_pipe, prompt="", guidance_scale=1.0), np.float64)
    guided = np.asarray(_generate(mini_pipe, prompt="", guidance_scale=7.5), np.float64)
    assert unguided.shape == (64, 64, 3)
    assert np.abs(guided - unguided).max() <= 2  # uint8 images; batch of 2 vs 1 may round differently
    other = np.asarray(_generate(mini_pipe, prompt="a red star in the top left", guidance_scale=7.5), np.float64)
    assert np.abs(other - unguided).mean() > 5  # a real prompt does change the picture


def test_prompt_over_77_tokens_warns_with_what_was_cut(mini_pipe):
    from diffusers.utils import logging as diffusers_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = diffusers_logging.get_logger("diffusers")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        _generate(mini_pipe, prompt="a red star " * 25 + "on a blue background", num_inference_steps=2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    messages = [r.getMessage() for r in records]
    assert any("truncated" in m and "blue background" in m for m in messages), messages


def test_the_text_encoder_is_mini_clips_text_tower():
    """The UNet reads mini-clip's text tower: retraining mini-clip's vision side must leave it as
    it is (scripts/build_mini_sd.py --clip-lock-text 1), tensor for tensor."""
    from safetensors.torch import load_file

    encoder = load_file(MINI_SD / "text_encoder" / "model.safetensors")
    clip = load_file(MINI_CLIP / "model.safetensors")
    tower = {k.removeprefix("text_model."): v for k, v in clip.items() if k.startswith("text_model.")}
    assert len(encoder) == 52 and set(encoder) == set(tower)
    assert all(encoder[k].equal(tower[k]) for k in encoder)
