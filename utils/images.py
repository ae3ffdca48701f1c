"""Images: grids, plots, PIL <-> tensor, and PIL <-> latents through a VAE.

Conventions: pixel tensors are (B, 3, H, W) floats in [-1, 1] (what the VAE eats); PIL images are
RGB; latents are (B, 4, H/8, W/8) already multiplied by `vae.config.scaling_factor` (what the UNet
eats).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def check_image_size(height: int, width: int, multiple: int = 8) -> None:
    """Raise a ValueError unless height and width are positive multiples of `multiple`.

    The VAE halves the image three times (8x per side), so SD needs sides divisible by 8.
    """
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            lower = max(multiple, (int(value) // multiple) * multiple) if value else multiple
            raise ValueError(
                f"{name}={value!r} must be a positive multiple of {multiple} (the VAE works at "
                f"1/{multiple} of the image size); try {lower} or {lower + multiple}"
            )


def to_pil(image) -> Image.Image:
    """A PIL RGB image from PIL, a uint8/float array (H, W, 3) or a tensor (3, H, W) in [-1, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        return tensor_to_pil(image)[0]
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    return Image.fromarray(array, "RGB")


def pil_to_tensor(images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
    """PIL image(s) -> float tensor (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"all images must have the same size, got {sorted(sizes)}")
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) or (3, H, W) in [-1, 1] -> list of PIL images (values clamped)."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a, "RGB") for a in array.permute(0, 2, 3, 1).numpy()]


@torch.no_grad()
def pil_to_latents(images, vae, generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode PIL image(s) to scaled latents (B, 4, H/8, W/8).

    With a `generator`, latents are sampled from the VAE's posterior (as SD's img2img does);
    without one, its mean is used. Multiplied by `vae.config.scaling_factor` so that their standard
    deviation is about 1, the scale the UNet was trained on.
    """
    pixels = pil_to_tensor(images)
    check_image_size(pixels.shape[2], pixels.shape[3])
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(pixels).latent_dist
    latents = dist.sample(generator) if generator is not None else dist.mean
    return latents * vae.config.scaling_factor


@torch.no_grad()
def latents_to_pil(latents: torch.Tensor, vae) -> list[Image.Image]:
    """Decode scaled latents (B, 4, h, w) to PIL images of (8h, 8w) pixels."""
    latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    return tensor_to_pil(vae.decode(latents).sample)


def image_grid(
    images: Sequence,
    rows: int | None = None,
    cols: int | None = None,
    titles: Sequence[str] | None = None,
    tile: int | None = None,
) -> Image.Image:
    """Paste images into one PIL grid, optionally with a title under each.

    Args:
        images: PIL images, arrays or tensors (see `to_pil`), all the same size.
        rows, cols: grid shape; by default one row (or as many rows as `cols` needs).
        titles: one short caption per image, drawn under it.
        tile: resize every image to tile x tile pixels (nearest neighbour, so that 64-pixel
            images stay crisp when enlarged).
    """
    images = [to_pil(im) for im in images]
    if not images:
        raise ValueError("image_grid needs at least one image")
    if tile:
        images = [im.resize((tile, tile), Image.NEAREST) for im in images]
    n = len(images)
    if cols is None:
        cols = n if rows is None else -(-n // rows)
    if rows is None:
        rows = -(-n // cols)
    if rows * cols < n:
        raise ValueError(f"a {rows}x{cols} grid cannot hold {n} images")
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} images")
    if titles is None:
        from diffusers.utils import make_image_grid

        blanks = [Image.new("RGB", images[0].size, "white")] * (rows * cols - n)
        return make_image_grid(images + blanks, rows=rows, cols=cols)
    w, h = images[0].size
    line = 12
    n_lines = max(len(_wrap(t, w)) for t in titles)
    cell_h = h + n_lines * line + 4
    grid = Image.new("RGB", (cols * w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, title) in enumerate(zip(images, titles)):
        x, y = (i % cols) * w, (i // cols) * cell_h
        grid.paste(im, (x, y))
        for k, text in enumerate(_wrap(title, w)):
            draw.text((x + 2, y + h + 2 + k * line), text, fill="black")
    return grid


def _wrap(text: str, width_px: int, char_px: int = 6) -> list[str]:
    """Greedy word wrap for PIL's default bitmap font (about 6 px per character)."""
    limit = max(4, width_px // char_px)
    lines, current = [], ""
    for word in str(text).split():
        if current and len(current) + 1 + len(word) > limit:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + [current] if current else lines or [""]


def show_images(images: Sequence, nrows: int = 1, titles: Sequence[str] | None = None,
                size: float = 2.0):
    """Plot images with matplotlib in `nrows` rows, with optional titles; returns the figure."""
    import matplotlib.pyplot as plt

    images = [to_pil(im) for im in images]
    ncols = -(-len(images) // nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i], interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig
