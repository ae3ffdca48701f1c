"""Checks for what image-conditioned pipelines take: strength, image size, depth maps.

Each check raises a ValueError that says what to do. Where diffusers itself would fail later with a
shape error deep inside, or silently do something else, the docstring says what it does.

    check_strength(0.8)
    check_image(image)                       # sides multiples of 8
    check_depth_map(depth_map, image)        # (B, H, W) tensor, not flat
    depth_to_latent_size(depth_map, 64, 64)  # (B, 1, 8, 8) in [-1, 1], as the depth pipeline does
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import check_image_size


def check_strength(strength: float) -> float:
    """`strength` must be a number in [0, 1]: the fraction of the denoising steps that are run
    (1.0 = start from pure noise, 0.0 = return the input). diffusers raises for values outside
    [0, 1] too. A strength so small that int(steps * strength) == 0 is accepted: with PNDM (N + 1
    timesteps) one step at t = 1 still runs; with DDIM the timestep slice is empty and the pipeline
    fails with "RuntimeError: cannot reshape tensor of 0 elements" (diffusers 0.42.1).
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not np.isfinite(strength):
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    if not 0 <= strength <= 1:
        raise ValueError(
            f"strength must lie in [0, 1] (the fraction of the denoising steps to run; 1 = start "
            f"from noise), got {strength}; try {min(1.0, max(0.0, float(strength)))}"
        )
    return float(strength)


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image, an array (H, W, C) or a tensor (C, H, W) / (B, C, H, W)."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    shape = tuple(image.shape)
    return (shape[-2], shape[-1]) if isinstance(image, torch.Tensor) else (shape[0], shape[1])


def check_image(image) -> tuple[int, int]:
    """Raise unless the image's sides are multiples of 8; return (height, width).

    (diffusers' image processor would silently resize a 70x70 image to 64x64: Lanczos, aspect
    ratio not kept; not a crop.)
    """
    height, width = image_size(image)
    check_image_size(int(height), int(width))
    return int(height), int(width)


def check_depth_map(depth_map, image=None, batch_size: int | None = None) -> torch.Tensor:
    """Check a depth map for `StableDiffusionDepth2ImgPipeline(depth_map=...)`; return it.

    The pipeline wants a float tensor (B, H, W), larger = nearer (like DPT's output); any H and W
    work (it is resized to the latent grid), B must be 1 or the batch size. Given a 2-D (H, W) map
    or a 4-D (B, 1, H, W) one, diffusers fails inside `F.interpolate` with a message about input
    dimensions; and a flat map (max == min) gives NaN latents, as the pipeline divides by the range.
    """
    if isinstance(depth_map, np.ndarray):
        raise ValueError("depth_map must be a torch tensor (B, H, W); use torch.from_numpy(depth_map)")
    if not isinstance(depth_map, torch.Tensor):
        raise ValueError(f"depth_map must be a torch tensor (B, H, W), got {type(depth_map).__name__}")
    shape = tuple(depth_map.shape)
    if depth_map.ndim == 2:
        raise ValueError(f"depth_map must be (B, H, W), got (H, W) = {shape}; pass depth_map[None]")
    if depth_map.ndim == 4 and shape[1] == 1:
        raise ValueError(f"depth_map must be (B, H, W), got {shape}; pass depth_map[:, 0]")
    if depth_map.ndim != 3:
        raise ValueError(f"depth_map must be (B, H, W), one channel, got shape {shape}")
    if not depth_map.is_floating_point():
        raise ValueError(f"depth_map must be a float tensor, got {depth_map.dtype}; use .float()")
    if image is not None:
        h, w = image_size(image)
        if (shape[1] * w) != (shape[2] * h):
            raise ValueError(
                f"depth_map is {shape[1]}x{shape[2]} (HxW) but the image is {h}x{w}: the aspect "
                "ratios differ, so the depth would be stretched; compute it from this image"
            )
    if batch_size is not None and shape[0] not in (1, batch_size):
        raise ValueError(f"depth_map has a batch of {shape[0]}; use 1 or the batch size {batch_size}")
    flat = (depth_map.amax(dim=(1, 2)) - depth_map.amin(dim=(1, 2))) <= 0
    if bool(flat.any()):
        raise ValueError(
            "a depth map is flat (max == min): the pipeline normalises depth by its range and would "
            "produce NaN; give a depth map with some variation"
        )
    if not torch.isfinite(depth_map).all():
        raise ValueError("depth_map contains NaN or infinite values")
    return depth_map


def depth_to_latent_size(depth_map: torch.Tensor, height: int, width: int,
                         vae_scale_factor: int = 8) -> torch.Tensor:
    """The depth the depth-to-image UNet gets, computed as `prepare_depth_map` does.

    Args:
        depth_map: (B, H', W') float, larger = nearer (any size: DPT's output or a true depth map).
        height, width: the image's size in pixels.
    Returns:
        (B, 1, height/8, width/8): resized bicubically (align_corners=False), then normalised per
        image to [-1, 1] (nearest = 1).
    """
    depth = F.interpolate(depth_map.unsqueeze(1).float(),
                          size=(height // vae_scale_factor, width // vae_scale_factor),
                          mode="bicubic", align_corners=False)
    lo = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
    hi = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
    return 2.0 * (depth - lo) / (hi - lo) - 1.0
