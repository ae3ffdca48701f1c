"""Inpainting masks: random training masks, checks, and the mask as the pipeline sees it.

Convention (diffusers' and SD's): a mask is one channel, (H, W), in [0, 1]; **1 (white) = repaint,
0 (black) = keep**. `StableDiffusionInpaintPipeline` binarises it at 0.5, keeps
`image * (mask < 0.5)` as the masked image (repainted pixels become 0, mid-gray in [-1, 1]) and
shrinks it to the latent grid with nearest-neighbour sampling, which reads the top-left pixel of
every 8 x 8 block. `mask_to_latent_size` and `masked_image` repeat those steps exactly.

    mask = random_mask(rng, 64, object_mask=render_scene(scene)["mask"])   # training mask
    mask = check_mask(mask, image)                                         # (H, W) float32 in [0, 1]
    small = mask_to_latent_size(mask)                                      # (1, 1, H/8, W/8)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .images import check_image_size
from .inputs import image_size

MASK_KINDS = ("box", "blob", "object", "full")
# how often each kind is drawn in training (SD's inpainting model also masked whole images)
MASK_PROBS = {"box": 0.3, "blob": 0.2, "object": 0.4, "full": 0.1}


# ----------------------------------------------------------------------------- random masks
def box_mask(rng: np.random.Generator, size: int = 64, min_frac: float = 0.15,
             max_frac: float = 0.6) -> np.ndarray:
    """A random axis-aligned rectangle of 1s; each side is `min_frac`..`max_frac` of the image.

    Returns float32 (size, size) with values in {0, 1}.
    """
    h, w = (int(round(rng.uniform(min_frac, max_frac) * size)) for _ in range(2))
    y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    mask = np.zeros((size, size), np.float32)
    mask[y : y + h, x : x + w] = 1
    return mask


def blob_mask(rng: np.random.Generator, size: int = 64, coverage: tuple[float, float] = (0.1, 0.5),
              grid: int = 4) -> np.ndarray:
    """A random smooth blob: coarse noise on a `grid` x `grid` lattice, upsampled (bicubic) and
    thresholded so that a fraction in `coverage` of the pixels is 1.

    Returns float32 (size, size) with values in {0, 1}.
    """
    noise = rng.standard_normal((grid, grid)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(noise, "F").resize((size, size), Image.BICUBIC))
    threshold = np.quantile(smooth, 1 - rng.uniform(*coverage))
    return (smooth > threshold).astype(np.float32)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow the 1-region of a (H, W) mask in [0, 1] by `pixels` pixels (a square max filter)."""
    if pixels <= 0:
        return np.asarray(mask, np.float32)
    image = Image.fromarray(np.round(np.asarray(mask) * 255).astype(np.uint8), "L")
    grown = image.filter(ImageFilter.MaxFilter(2 * pixels + 1))
    return np.asarray(grown, np.float32) / 255


def object_mask(coverage: np.ndarray, pixels: int = 2) -> np.ndarray:
    """A toy-world object's mask (`render_scene(scene)["mask"]`, soft coverage in [0, 1]),
    binarised at 0.5 and dilated by `pixels`, so that the anti-aliased rim is repainted too.

    Returns float32 (H, W) with values in {0, 1}.
    """
    return dilate((np.asarray(coverage) >= 0.5).astype(np.float32), pixels)


def random_mask(rng: np.random.Generator, size: int = 64, coverage: np.ndarray | None = None,
                probs: dict[str, float] | None = None) -> tuple[np.ndarray, str]:
    """One training mask, a box, a blob, the (dilated) object or the whole image.

    Args:
        rng: a `np.random.Generator`.
        coverage: the scene's object mask (H, W) in [0, 1]; without it no object masks are drawn.
        probs: the probability of each kind (default `MASK_PROBS`).
    Returns:
        (mask, kind): float32 (size, size) in {0, 1}, and which kind it is.
    """
    probs = dict(probs or MASK_PROBS)
    if coverage is None:
        probs.pop("object", None)
    kinds = list(probs)
    p = np.array([probs[k] for k in kinds], np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    if kind == "box":
        return box_mask(rng, size), kind
    if kind == "blob":
        return blob_mask(rng, size), kind
    if kind == "object":
        return object_mask(coverage, int(rng.integers(1, 5))), kind
    return np.ones((size, size), np.float32), kind


# ----------------------------------------------------------------------------- checks
def check_mask(mask, image=None) -> np.ndarray:
    """Check an inpainting mask (and that it fits `image`); return it as float32 (H, W) in [0, 1].

    Accepts a PIL image in mode "L" or "1" (0-255 -> 0-1), or a NumPy array / torch tensor of
    shape (H, W), (H, W, 1), (1, H, W) or (1, 1, H, W) with values in [0, 1].

    Raises a ValueError, saying what to do, when the mask has more than one channel (diffusers would
    silently turn an RGB mask to grayscale), when its values leave [0, 1] (a 0-255 array, say),
    when its sides are not multiples of 8, or when it is not the size of `image` (diffusers would
    silently stretch both to one size).
    """
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "1"):
            raise ValueError(
                f"the mask must be single-channel (PIL mode 'L' or '1'), got mode {mask.mode!r}; "
                "convert it with mask.convert('L') if its channels are equal"
            )
        array = np.asarray(mask.convert("L"), np.float32) / 255
    else:
        array = mask.detach().cpu().float().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if array.dtype == bool:
            array = array.astype(np.float32)
        shape = array.shape
        if array.ndim == 3 and 1 in (shape[0], shape[2]):
            array = array[0] if shape[0] == 1 else array[..., 0]
        elif array.ndim == 4 and shape[:2] == (1, 1):
            array = array[0, 0]
        if array.ndim != 2:
            raise ValueError(
                f"the mask must be single-channel, (H, W) or (1, H, W), got shape {shape}; for an "
                "RGB mask take one channel (mask[..., 0]) or convert the PIL image with .convert('L')"
            )
        array = array.astype(np.float32)
        lo, hi = float(array.min()), float(array.max())
        if lo < 0 or hi > 1 or not np.isfinite(array).all():
            raise ValueError(
                f"mask values must lie in [0, 1] (1 = repaint, 0 = keep), got [{lo:g}, {hi:g}]; "
                "divide a 0-255 mask by 255"
            )
    check_image_size(*array.shape)
    if image is not None and image_size(image) != array.shape:
        raise ValueError(
            f"the mask is {array.shape[0]}x{array.shape[1]} (HxW) but the image is "
            f"{image_size(image)[0]}x{image_size(image)[1]}; resize the mask to the image's size "
            "(PIL: mask.resize(image.size, Image.NEAREST))"
        )
    return array


# ----------------------------------------------------------------------------- as the pipeline sees it
def _as_batch(mask) -> torch.Tensor:
    """(H, W) / (B, H, W) / (B, 1, H, W) array or tensor -> float tensor (B, 1, H, W)."""
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
    while mask.ndim < 4:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)
    return mask


def binarize(mask) -> torch.Tensor:
    """The pipeline's mask: 1 where mask >= 0.5, else 0; a float tensor (B, 1, H, W)."""
    return (_as_batch(mask) >= 0.5).float()


def mask_to_latent_size(mask, vae_scale_factor: int = 8) -> torch.Tensor:
    """The mask the inpainting UNet gets: binarised, then shrunk by `vae_scale_factor` per side with
    nearest-neighbour sampling (`F.interpolate`'s default, as in `prepare_mask_latents`).

    Returns a float tensor (B, 1, H/8, W/8) in {0, 1}. Nearest sampling reads one pixel per 8 x 8
    block, so a region smaller than a block can vanish at latent size.
    """
    mask = binarize(mask)
    h, w = mask.shape[-2:]
    return F.interpolate(mask, size=(h // vae_scale_factor, w // vae_scale_factor))


def masked_image(pixels: torch.Tensor, mask) -> torch.Tensor:
    """The pipeline's masked image: `pixels * (mask < 0.5)`.

    Args:
        pixels: (B, 3, H, W) in [-1, 1].
        mask: (H, W), (B, H, W) or (B, 1, H, W) in [0, 1], 1 = repaint.
    Returns:
        (B, 3, H, W): repainted pixels are 0 (mid-gray), the rest unchanged.
    """
    return pixels * (binarize(mask).to(pixels.device) < 0.5)
