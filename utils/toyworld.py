"""The toy world: a seeded, procedural generator of captioned shapes.

Every scene is one filled, flat-coloured shape (circle, square, triangle or five-pointed star) on a
flat background. A scene renders to an RGB image, a depth map and an object mask, and describes
itself with a caption from a fixed grammar:

    a {size} {colour} {shape} {position phrase} on a {background} background

with any of size, colour, position and background left out in some captions ("a red star",
"a large blue circle on the left"). The bundled mini Stable Diffusion was trained on this world, and
`utils.judge` reads the same attributes back from pixels.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# colour name -> RGB; objects use the first eight, backgrounds all nine
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {**COLOURS, "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
# circumscribed diameter as a fraction of the image side
SIZE_RANGES = {"small": (0.20, 0.28), "large": (0.40, 0.50)}
# row-major 3x3 grid: index = 3 * row + col
POSITIONS = (
    "in the top left",
    "at the top",
    "in the top right",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left",
    "at the bottom",
    "in the bottom right",
)
STAR_INNER_RATIO = 0.382  # inner / outer radius of a regular five-pointed star
COLOUR_JITTER = 8  # +- per RGB channel
SUPERSAMPLE = 4  # draw at 4x, then box-filter down: anti-aliased edges

# the depth map's convention (as DPT's relative inverse depth): larger = nearer
DEPTH_BACKGROUND = (0.0, 0.3)  # far at the top of the image, nearer at the bottom
DEPTH_OBJECT = 0.8


@dataclass(frozen=True)
class Scene:
    """One toy-world scene: what is drawn, and which parts the caption mentions."""

    shape: str
    colour: str
    size: str
    position: int  # 0..8, row-major over the 3x3 grid
    background: str
    rotation: float  # degrees
    center: tuple[float, float]  # (x, y) as fractions of the image side
    diameter: float  # circumscribed diameter as a fraction of the image side
    rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]
    mention: tuple[bool, bool, bool, bool] = (True, True, True, True)  # size, colour, position, bg

    @property
    def caption(self) -> str:
        return caption_for(self)

    @property
    def attributes(self) -> dict[str, str]:
        """The attributes the caption asks for (shape always; the others when mentioned)."""
        out = {"shape": self.shape}
        if self.mention[0]:
            out["size"] = self.size
        if self.mention[1]:
            out["colour"] = self.colour
        if self.mention[2]:
            out["position"] = POSITIONS[self.position]
        if self.mention[3]:
            out["background"] = self.background
        return out


def _article(text: str) -> str:
    """'a' or 'an' for the word that starts `text`."""
    return "an" if text[0] in "aeiou" else "a"


def caption_for(scene: Scene) -> str:
    """The caption of a scene in the course grammar, leaving out what `scene.mention` leaves out."""
    size_on, colour_on, position_on, background_on = scene.mention
    words = []
    if size_on:
        words.append(scene.size)
    if colour_on:
        words.append(scene.colour)
    words.append(scene.shape)
    noun_phrase = " ".join(words)
    text = f"{_article(noun_phrase)} {noun_phrase}"
    if position_on:
        text += f" {POSITIONS[scene.position]}"
    if background_on:
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(
        int(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER)))) for c in rgb
    )


def sample_scene(
    rng: random.Random,
    *,
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
    position: int | str | None = None,
    background: str | None = None,
    mention_prob: float = 0.75,
    mention: tuple[bool, bool, bool, bool] | None = None,
) -> Scene:
    """Draw a random scene; any attribute given is fixed instead of drawn.

    Args:
        rng: a `random.Random`; the same seed gives the same scene.
        mention_prob: probability that the caption mentions each of size, colour, position and
            background (the shape is always mentioned). Ignored when `mention` is given.
        position: a grid index 0..8 or one of `POSITIONS`.
    """
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(list(COLOURS))
    size = size or rng.choice(SIZES)
    if position is None:
        position = rng.randrange(9)
    elif isinstance(position, str):
        if position not in POSITIONS:
            raise ValueError(f"unknown position {position!r}; choose a grid index 0..8 or one of {list(POSITIONS)}")
        position = POSITIONS.index(position)
    if background is None:
        background = rng.choice([b for b in BACKGROUNDS if b != colour])
    for value, valid, what in (
        (shape, SHAPES, "shape"),
        (colour, COLOURS, "colour"),
        (size, SIZES, "size"),
        (background, BACKGROUNDS, "background"),
    ):
        if value not in valid:
            raise ValueError(f"unknown {what} {value!r}; choose one of {list(valid)}")
    if not 0 <= position < 9:
        raise ValueError(f"position must be 0..8 or one of {list(POSITIONS)}, got {position!r}")
    if background == colour:
        raise ValueError(f"the background cannot be the object's own colour ({colour})")

    diameter = rng.uniform(*SIZE_RANGES[size])
    radius = diameter / 2
    row, col = divmod(position, 3)
    # centre inside its grid cell (with a 10% margin) and the whole shape inside the image
    margin = 0.1 / 3

    def _axis(cell: int) -> float:
        lo = max(cell / 3 + margin, radius)
        hi = min((cell + 1) / 3 - margin, 1 - radius)
        return rng.uniform(lo, hi) if lo < hi else (lo + hi) / 2

    cx, cy = _axis(col), _axis(row)
    if mention is None:
        mention = tuple(rng.random() < mention_prob for _ in range(4))
    return Scene(
        shape=shape,
        colour=colour,
        size=size,
        position=position,
        background=background,
        rotation=rng.uniform(0, 360),
        center=(cx, cy),
        diameter=diameter,
        rgb=_jitter(COLOURS[colour], rng),
        background_rgb=_jitter(BACKGROUNDS[background], rng),
        mention=mention,
    )


def shape_polygon(
    shape: str, center: tuple[float, float], radius: float, rotation: float
) -> list[tuple[float, float]]:
    """Vertices (x, y) of a regular polygon shape; circles are not polygons and raise."""
    n_points = {"square": 4, "triangle": 3, "star": 10}.get(shape)
    if n_points is None:
        raise ValueError(f"{shape!r} has no polygon")
    cx, cy = center
    points = []
    for k in range(n_points):
        r = radius * (STAR_INNER_RATIO if shape == "star" and k % 2 else 1.0)
        angle = math.radians(rotation - 90) + 2 * math.pi * k / n_points
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def render_scene(scene: Scene, image_size: int = 64) -> dict:
    """Render a scene.

    Returns a dict with
        image: PIL RGB image, image_size x image_size;
        mask: float32 array (H, W) in [0, 1], the object's coverage of each pixel;
        depth: float32 array (H, W) in [0, 1], larger = nearer (background 0.0-0.3, object 0.8);
        caption: the scene's caption.
    """
    big = image_size * SUPERSAMPLE
    cx, cy = scene.center[0] * big, scene.center[1] * big
    radius = scene.diameter / 2 * big
    mask_big = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask_big)
    if scene.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    else:
        draw.polygon(shape_polygon(scene.shape, (cx, cy), radius, scene.rotation), fill=255)
    mask = np.asarray(mask_big.resize((image_size, image_size), Image.BOX), dtype=np.float32) / 255
    alpha = mask[..., None]
    fg = np.array(scene.rgb, dtype=np.float32)
    bg = np.array(scene.background_rgb, dtype=np.float32)
    pixels = alpha * fg + (1 - alpha) * bg
    image = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")
    far, near = DEPTH_BACKGROUND
    ramp = np.linspace(far, near, image_size, dtype=np.float32)[:, None]
    depth = (1 - mask) * np.broadcast_to(ramp, mask.shape) + mask * DEPTH_OBJECT
    return {"image": image, "mask": mask, "depth": depth.astype(np.float32), "caption": scene.caption}


def make_scenes(n: int, seed: int, mention_prob: float = 0.75) -> list[Scene]:
    """`n` random scenes, the same for a seed."""
    rng = random.Random(seed)
    return [sample_scene(rng, mention_prob=mention_prob) for _ in range(n)]


def make_dataset(n: int, seed: int, image_size: int = 64, mention_prob: float = 0.75):
    """`n` scenes with their rendered images as a uint8 array (n, H, W, 3), the same for a seed.

    Returns (scenes, images).
    """
    scenes = make_scenes(n, seed, mention_prob)
    images = np.stack([np.asarray(render_scene(s, image_size)["image"]) for s in scenes])
    return scenes, images


def grammar_prompts(n: int, seed: int, full: bool = True) -> list[Scene]:
    """`n` random scenes for evaluation; with `full`, every caption names all five attributes."""
    rng = random.Random(seed)
    mention = (True, True, True, True) if full else None
    return [sample_scene(rng, mention=mention) for _ in range(n)]
