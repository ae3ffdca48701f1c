"""Inpainting masks: the random training masks, `check_mask`'s errors, and the helpers that must
compute exactly what StableDiffusionInpaintPipeline computes."""

import numpy as np
import pytest
import torch
from PIL import Image

from utils.masks import (
    MASK_KINDS,
    blob_mask,
    box_mask,
    check_mask,
    dilate,
    mask_to_latent_size,
    masked_image,
    object_mask,
    random_mask,
)
from utils.toyworld import render_scene, sample_scene


@pytest.fixture(scope="module")
def inpaint_pipe(mini_pipe):
    """The bundled mini-sd's parts in diffusers' inpainting pipeline (its mask processing is what
    we compare with; the 4-channel UNet is never run here)."""
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline.from_pipe(mini_pipe)


def _scene_render(seed=0):
    import random

    return render_scene(sample_scene(random.Random(seed), size="large"))


def test_random_masks_are_binary_and_seeded():
    for make in (box_mask, blob_mask):
        a, b = make(np.random.default_rng(3)), make(np.random.default_rng(3))
        assert a.shape == (64, 64) and a.dtype == np.float32
        assert set(np.unique(a)) <= {0.0, 1.0} and np.array_equal(a, b)
        assert 0.01 < a.mean() < 0.7
    render = _scene_render()
    kinds = {random_mask(np.random.default_rng(i), 64, render["mask"])[1] for i in range(60)}
    assert kinds == set(MASK_KINDS)
    kinds = {random_mask(np.random.default_rng(i), 64)[1] for i in range(60)}
    assert "object" not in kinds  # no scene mask given, no object masks


def test_object_mask_covers_the_object_and_its_rim():
    coverage = _scene_render()["mask"]
    mask = object_mask(coverage, pixels=2)
    assert (mask[coverage > 0] == 1).all()  # the anti-aliased rim too
    assert mask.sum() > (coverage >= 0.5).sum()
    assert np.array_equal(dilate(mask, 0), mask)


def test_check_mask_accepts_the_usual_forms():
    image = Image.new("RGB", (64, 64))
    square = np.zeros((64, 64), np.float32)
    square[16:48, 16:48] = 1
    pil = Image.fromarray((square * 255).astype(np.uint8), "L")
    for mask in (pil, pil.convert("1"), square, square[None], square[..., None], square > 0.5,
                 torch.from_numpy(square)[None, None]):
        out = check_mask(mask, image)
        assert out.shape == (64, 64) and out.dtype == np.float32
        assert np.array_equal(out, square)


@pytest.mark.parametrize(
    "mask, match",
    [
        (Image.new("RGB", (64, 64)), "single-channel .*convert\\('L'\\)"),
        (np.zeros((64, 64, 3), np.float32), "single-channel"),
        (np.zeros((2, 64, 64), np.float32), "single-channel"),
        (np.full((64, 64), 255.0), "in \\[0, 1\\].*divide a 0-255 mask by 255"),
        (np.full((64, 64), -0.5), "in \\[0, 1\\]"),
        (np.full((64, 64), np.nan), "in \\[0, 1\\]"),
        (np.zeros((32, 32), np.float32), "mask is 32x32 .* image is 64x64; resize the mask"),
    ],
)
def test_check_mask_bad_input_says_what_to_do(mask, match):
    with pytest.raises(ValueError, match=match):
        check_mask(mask, Image.new("RGB", (64, 64)))


def test_check_mask_size_not_a_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        check_mask(np.zeros((60, 64), np.float32))


def test_helpers_match_the_inpainting_pipeline(inpaint_pipe):
    rng = np.random.default_rng(0)
    mask = np.round(rng.random((64, 64)) * 255) / 255  # soft values: binarisation matters
    mask_pil = Image.fromarray((mask * 255).astype(np.uint8), "L")
    # the pipeline's steps 5 and 7: preprocess (binarise at 0.5), masked image, latent-size mask
    mask_condition = inpaint_pipe.mask_processor.preprocess(mask_pil, height=64, width=64)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(pixels * (mask_condition < 0.5), masked_image(pixels, mask))
    small, _ = inpaint_pipe.prepare_mask_latents(
        mask_condition, torch.zeros(1, 4, 8, 8), 1, 64, 64, torch.float32, "cpu", None, False)
    assert torch.equal(small, mask_to_latent_size(mask))
    assert small.shape == (1, 1, 8, 8)


def test_small_masks_can_vanish_at_latent_size():
    # nearest-neighbour sampling reads the top-left pixel of each 8x8 block
    mask = np.zeros((64, 64), np.float32)
    mask[2:6, 2:6] = 1
    assert mask_to_latent_size(mask).sum() == 0
    mask[8, 8] = 1
    assert mask_to_latent_size(mask).sum() == 1
