"""Input checks for the image-conditioned pipelines: strength, image size, depth maps, and the
depth preparation that must match StableDiffusionDepth2ImgPipeline's."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from utils.inputs import check_depth_map, check_image, check_strength, depth_to_latent_size


@pytest.mark.parametrize("strength", [0, 0.3, 1, 1.0])
def test_strength_in_range(strength):
    assert check_strength(strength) == float(strength)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_strength_out_of_range_is_a_clear_error(strength):
    with pytest.raises(ValueError, match=r"strength must .*\[0, 1\]"):
        check_strength(strength)


def test_strength_error_suggests_the_nearest_valid_value():
    with pytest.raises(ValueError, match="try 1.0"):
        check_strength(1.2)


def test_image_size_must_be_a_multiple_of_8():
    assert check_image(Image.new("RGB", (64, 48))) == (48, 64)
    assert check_image(torch.zeros(1, 3, 64, 64)) == (64, 64)
    with pytest.raises(ValueError, match="width=70 must be a positive multiple of 8.*try 64 or 72"):
        check_image(Image.new("RGB", (70, 64)))
    with pytest.raises(ValueError, match="height=60"):
        check_image(np.zeros((60, 64, 3), np.uint8))


def _depth(batch=1, size=64):
    ramp = torch.linspace(0, 1, size)[:, None].expand(size, size)
    return ramp.expand(batch, size, size).clone()


def test_depth_map_good_shapes_pass():
    image = Image.new("RGB", (64, 64))
    assert check_depth_map(_depth(), image).shape == (1, 64, 64)
    assert check_depth_map(_depth(size=32), image, batch_size=4).shape == (1, 32, 32)  # any size
    check_depth_map(_depth(batch=4), image, batch_size=4)


@pytest.mark.parametrize(
    "depth_map, match",
    [
        (_depth()[0], r"got \(H, W\).*pass depth_map\[None\]"),
        (_depth()[:, None], r"pass depth_map\[:, 0\]"),
        (torch.zeros(1, 3, 64, 64), "one channel"),
        (_depth().numpy(), "torch.from_numpy"),
        (_depth().long(), r"float tensor.*\.float\(\)"),
        (torch.full((1, 64, 64), 0.5), "flat.*NaN"),
        (_depth()[:, :, :32], "aspect ratios differ"),
        (_depth(batch=3), "batch of 3; use 1 or the batch size 2"),
    ],
)
def test_depth_map_wrong_shape_is_a_clear_error(depth_map, match):
    with pytest.raises(ValueError, match=match):
        check_depth_map(depth_map, Image.new("RGB", (64, 64)), batch_size=2)


def test_depth_preparation_matches_the_pipeline():
    from diffusers import StableDiffusionDepth2ImgPipeline

    depth = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(0)) * 3
    image = [Image.new("RGB", (64, 64))] * 2
    # prepare_depth_map only reads vae_scale_factor when a depth map is given
    fake = SimpleNamespace(vae_scale_factor=8)
    expected = StableDiffusionDepth2ImgPipeline.prepare_depth_map(
        fake, image, depth, 2, False, torch.float32, torch.device("cpu"))
    ours = depth_to_latent_size(depth, 64, 64)
    assert ours.shape == (2, 1, 8, 8)
    torch.testing.assert_close(ours, expected)
    assert torch.allclose(ours.amin((1, 2, 3)), torch.tensor(-1.0))
    assert torch.allclose(ours.amax((1, 2, 3)), torch.tensor(1.0))


def test_the_pipeline_itself_on_bad_depth_maps():
    """What diffusers does without our check: an (H, W) map fails inside F.interpolate, and a flat
    map gives NaN (it divides by max - min)."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    fake, image = SimpleNamespace(vae_scale_factor=8), [Image.new("RGB", (64, 64))]
    prepare = StableDiffusionDepth2ImgPipeline.prepare_depth_map
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        prepare(fake, image, _depth()[0], 1, False, torch.float32, torch.device("cpu"))
    flat = prepare(fake, image, torch.full((1, 64, 64), 0.5), 1, False, torch.float32,
                   torch.device("cpu"))
    assert torch.isnan(flat).all()
