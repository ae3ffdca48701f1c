"""An independent judge: read a toy-world image's attributes back from its pixels.

No model is involved: the background is the median colour of the image, the object is what differs from
it (largest connected blob), its colour the nearest palette colour to its median, its size and
position come from its extent and centroid, and its shape from two measurements:

    fill     = area / area of the circumscribed circle  (circle 1.0, square 0.64, triangle 0.41,
                                                          star 0.36)
    solidity = area / area of the convex hull          (1.0 for all convex shapes, star 0.47)

`judge_image` returns what it sees; `score` compares that with what a prompt asked for.
"""

from __future__ import annotations

import re
from collections import deque

import numpy as np
from PIL import Image

from .toyworld import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

ATTRIBUTES = ("shape", "colour", "size", "position", "background")
OBJECT_THRESHOLD = 45.0  # RGB distance from the background that counts as object
SIZE_SPLIT = 0.34  # circumscribed diameter / image side between "small" and "large"


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dist = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float32) - rgb, axis=1)
    return names[int(np.argmin(dist))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _classify_shape(fill: float, solidity: float) -> str:
    if solidity < 0.72:
        return "star"
    if fill > 0.81:
        return "circle"
    if fill > 0.55:
        return "square"
    return "triangle"


def judge_image(image) -> dict:
    """Read the attributes of a toy-world image from its pixels.

    Args:
        image: PIL image or uint8 array (H, W, 3).
    Returns:
        dict with "background", and when an object is found "colour", "shape", "size",
        "position", plus the measurements ("fill", "solidity", "diameter", "center", "area").
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {pixels.shape}")
    pixels = pixels.astype(np.float32)
    h, w, _ = pixels.shape
    # the object covers at most ~20% of the image, so the median pixel is background (sturdier
    # than the border, where generated images often carry a darker rim)
    bg_rgb = np.median(pixels.reshape(-1, 3), axis=0)
    result: dict = {"background": _nearest(bg_rgb, BACKGROUNDS)}
    distance = np.linalg.norm(pixels - bg_rgb, axis=2)
    mask = _largest_component(distance > OBJECT_THRESHOLD)
    area = int(mask.sum())
    if area < 4:
        return result
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    r_max = float(np.sqrt((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2).max()) + 0.5
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    hull = _hull_area(corners)
    fill = area / (np.pi * r_max**2)
    solidity = area / hull if hull else 0.0
    side = max(h, w)
    col = min(2, int(cx / w * 3))
    row = min(2, int(cy / h * 3))
    result.update(
        colour=_nearest(np.median(pixels[mask], axis=0), COLOURS),
        shape=_classify_shape(fill, solidity),
        size="large" if 2 * r_max / side > SIZE_SPLIT else "small",
        position=POSITIONS[3 * row + col],
        fill=round(float(fill), 3),
        solidity=round(float(solidity), 3),
        diameter=round(2 * r_max / side, 3),
        center=(round(cx / w, 3), round(cy / h, 3)),
        area=area,
    )
    return result


_CAPTION = re.compile(
    r"^an? (?:(?P<size>{sizes}) )?(?:(?P<colour>{colours}) )?(?P<shape>{shapes})"
    r"(?: (?P<position>{positions}))?(?: on an? (?P<background>{backgrounds}) background)?$".format(
        sizes="|".join(SIZES),
        colours="|".join(COLOURS),
        shapes="|".join(SHAPES),
        positions="|".join(POSITIONS),
        backgrounds="|".join(BACKGROUNDS),
    )
)


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a grammar caption asks for, e.g. {"colour": "red", "shape": "star"}."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(
            f"{caption!r} is not in the toy-world grammar: 'a {{size}} {{colour}} {{shape}} "
            "{position} on a {background} background', with size, colour, position and "
            "background optional"
        )
    return {k: v for k, v in match.groupdict().items() if v is not None}


def score(image, prompt: str | dict) -> dict[str, bool]:
    """Which of the attributes a prompt asks for the image gets right, plus "all"."""
    wanted = parse_caption(prompt) if isinstance(prompt, str) else dict(prompt)
    seen = judge_image(image)
    result = {k: seen.get(k) == v for k, v in wanted.items()}
    result["all"] = all(result.values())
    return result
