import numpy as np
import pytest
import torch
from PIL import Image

from utils import (
    check_image_size,
    get_device,
    get_dtype,
    image_grid,
    latents_to_pil,
    make_generator,
    pil_to_latents,
    pil_to_tensor,
    seed_everything,
    tensor_to_pil,
    to_pil,
)


def _solid(rgb, size=16):
    return Image.new("RGB", (size, size), rgb)


def test_pil_tensor_round_trip_is_exact():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(3)]
    tensor = pil_to_tensor(images)
    assert tensor.shape == (3, 3, 16, 24) and tensor.min() >= -1 and tensor.max() <= 1
    back = tensor_to_pil(tensor)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, back))


def test_conversions_reject_bad_input():
    with pytest.raises(ValueError, match="same size"):
        pil_to_tensor([_solid("red", 16), _solid("red", 24)])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tensor_to_pil(torch.zeros(2, 4, 8, 8))


def test_to_pil_accepts_arrays_tensors_and_pil():
    assert to_pil(np.ones((8, 8, 3), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert to_pil(torch.zeros(3, 8, 8)).getpixel((0, 0)) == (128, 128, 128)
    assert to_pil(np.zeros((8, 8), dtype=np.uint8)).mode == "RGB"


def test_image_grid_layout_and_titles():
    images = [_solid(c) for c in ("red", "green", "blue", "white", "black")]
    assert image_grid(images).size == (80, 16)
    grid = image_grid(images, rows=2)
    assert grid.size == (48, 32)
    assert grid.getpixel((40, 20)) == (255, 255, 255)  # the empty sixth cell
    titled = image_grid(images, cols=5, titles=list("abcde"), tile=32)
    assert titled.size[0] == 160 and titled.size[1] > 32
    with pytest.raises(ValueError, match="cannot hold"):
        image_grid(images, rows=1, cols=2)
    with pytest.raises(ValueError, match="titles"):
        image_grid(images, titles=["only one"])


@pytest.mark.parametrize("height,width", [(60, 64), (64, 100), (0, 64), (64.0, 64)])
def test_check_image_size_errors(height, width):
    with pytest.raises(ValueError, match="multiple of 8"):
        check_image_size(height, width)


def test_check_image_size_accepts_multiples_of_8():
    check_image_size(64, 512)


def test_latent_helpers_use_the_scaling_factor(tiny_vae):
    images = [_solid((200, 30, 30), 32), _solid((30, 30, 200), 32)]
    latents = pil_to_latents(images, tiny_vae)
    assert latents.shape == (2, 4, 4, 4)
    pixels = pil_to_tensor(images)
    expected = tiny_vae.encode(pixels).latent_dist.mean * 0.5
    torch.testing.assert_close(latents, expected)
    decoded = latents_to_pil(latents, tiny_vae)
    direct = tensor_to_pil(tiny_vae.decode(expected / 0.5).sample)
    assert [d.size for d in decoded] == [(32, 32)] * 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(decoded, direct))
    sampled = pil_to_latents(images, tiny_vae, generator=make_generator(0))
    assert not torch.equal(sampled, latents)
    torch.testing.assert_close(sampled, pil_to_latents(images, tiny_vae, make_generator(0)))


def test_latent_helpers_reject_sizes_not_multiple_of_8(tiny_vae):
    with pytest.raises(ValueError, match="multiple of 8"):
        pil_to_latents(_solid("red", 20), tiny_vae)


def test_generators_reproduce():
    a = torch.randn(4, generator=make_generator(3))
    b = torch.randn(4, generator=make_generator(3))
    c = torch.randn(4, generator=make_generator(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert make_generator(0).device.type == "cpu"
    seed_everything(5)
    x = torch.rand(3), np.random.rand(3)
    seed_everything(5)
    y = torch.rand(3), np.random.rand(3)
    assert torch.equal(x[0], y[0]) and np.array_equal(x[1], y[1])


def test_device_and_dtype():
    device = get_device()
    assert device.type in ("cuda", "mps", "cpu")
    assert get_device("cpu").type == "cpu"
    assert get_dtype("cpu") == torch.float32
    assert get_dtype("cuda") == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available here"):
            get_device("cuda")
