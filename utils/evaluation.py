"""Measurements of the models, all judged from pixels by `utils.judge` (never by the model itself).

- `prompt_accuracy`: generate one image per grammar prompt and count the attributes it got right;
- `vae_roundtrip`: PSNR of VAE reconstructions, and the judge run on those reconstructions;
- `clip_zero_shot`: colour, shape, position and size read by CLIP from grammar prompts;
- `shape_by_size`: the judge's shape verdicts split by size and shape (where the shape errors are);
- `colour_by_colour`: the judge's colour verdicts split by the colour the caption asked for;
- `silhouette_iou`, `silhouette_by_shape`, `silhouette_references`: the depth model's outline
  against its input's, split by shape, and the same measure for renders that are right but for one
  pixel of placement or the rotation.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
import torch

from .images import latents_to_pil, pil_to_latents
from .judge import ATTRIBUTES, OBJECT_THRESHOLD, _largest_component, judge_image, score
from .masks import object_mask
from .seeding import make_generator
from .toyworld import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    grammar_prompts,
    render_scene,
)

TEXT2IMAGE_EVAL_SEED = 1_000_003  # scripts/evaluate.py's prompts (prompt i generated with seed +i) and
# held-out images (from +1, and +77 for the VAE's further ones); never rendered for training
EVAL_SEED = 2_000_003  # the inpainting and depth evaluation scenes (never rendered for training)


def _rates(hits: dict[str, list[bool]]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in hits.items()}


def scene_attributes(scene: Scene) -> dict[str, str]:
    """All five attributes of a scene, mentioned in its caption or not."""
    return {"shape": scene.shape, "colour": scene.colour, "size": scene.size,
            "position": POSITIONS[scene.position], "background": scene.background}


@torch.no_grad()
def prompt_accuracy(pipe, scenes: list[Scene], num_inference_steps: int = 25,
                    guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 25,
                    return_images: bool = False) -> dict:
    """Generate one image per scene caption (seed `seed + i` for the i-th) and judge it.

    Returns {"n": ..., "all": rate, "<attribute>": rate for each attribute the captions ask for}
    (and "images" with `return_images`).
    """
    hits: dict[str, list[bool]] = defaultdict(list)
    images = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        out = pipe(
            [s.caption for s in chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[make_generator(seed + start + i) for i in range(len(chunk))],
        ).images
        for image, scene in zip(out, chunk):
            for key, ok in score(image, scene.attributes).items():
                hits[key].append(ok)
        if return_images:
            images += out
    result = {"n": len(scenes), **_rates(hits)}
    if return_images:
        result["images"] = images
    return result


@torch.no_grad()
def vae_roundtrip(vae, scenes: list[Scene], batch_size: int = 100, return_images: bool = False) -> dict:
    """Encode and decode rendered scenes; PSNR (dB, on 0-255) and the judge on the round trips
    (and "images", the reconstructions, with `return_images`)."""
    psnrs, hits, images = [], defaultdict(list), []
    size = vae.config.sample_size
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        originals = [render_scene(s, size)["image"] for s in chunk]
        recons = latents_to_pil(pil_to_latents(originals, vae), vae)
        if return_images:
            images += recons
        for original, recon, scene in zip(originals, recons, chunk):
            a = np.asarray(original, dtype=np.float64)
            b = np.asarray(recon, dtype=np.float64)
            psnrs.append(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-10)))
            seen = judge_image(recon)
            wanted = scene_attributes(scene)
            for key in ATTRIBUTES:
                hits[key].append(seen.get(key) == wanted[key])
            hits["all"].append(all(seen.get(k) == v for k, v in wanted.items()))
    result = {"n": len(scenes), "psnr": float(np.mean(psnrs)), "psnr_min": float(np.min(psnrs)),
              **_rates(hits)}
    if return_images:
        result["images"] = images
    return result


def _verdict_row(seen: list, wanted: str) -> dict:
    """{"n", "right", "seen"} for a list of the judge's readings of one attribute."""
    counts = Counter(seen)
    return {"n": len(seen), "right": counts[wanted] / len(seen) if seen else None,
            "seen": dict(counts.most_common())}


def shape_by_size(images, scenes: list[Scene]) -> dict[str, dict]:
    """The judge's shape verdict on each image whose caption asks for a size, against its scene's shape,
    split by size and shape:
    {"small star": {"n": 18, "right": 0.11, "seen": {"square": 10, "triangle": 6, "star": 2}}, ...}
    ("seen" counts what the judge read, None where it found no object; "right" is None for no images)."""
    seen = [judge_image(im).get("shape") for im in images]
    return {f"{size} {shape}": _verdict_row([v for v, s in zip(seen, scenes)
                                             if s.attributes.get("size") == size and s.shape == shape], shape)
            for size in SIZES for shape in SHAPES}


def colour_by_colour(images, scenes: list[Scene]) -> dict[str, dict]:
    """The judge's colour verdict on each image whose caption asks for a colour, split by that colour:
    {"yellow": {"n": 12, "right": 0.75, "seen": {"yellow": 9, "orange": 2, None: 1}}, ...}
    ("seen" counts what the judge read, None where it found no object; "right" is None for no images)."""
    seen = [judge_image(im).get("colour") for im in images]
    return {colour: _verdict_row([v for v, s in zip(seen, scenes)
                                  if s.attributes.get("colour") == colour], colour)
            for colour in COLOURS}


def _unit(features) -> torch.Tensor:
    features = getattr(features, "pooler_output", features)
    return features / features.norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_zero_shot(model, processor, scenes: list[Scene]) -> dict:
    """CLIP reads the toy world: which prompt's text vector is closest to the image's vector.

    - colour and shape: one choice among the 32 prompts "a {colour} {shape}";
    - position: among the 9 prompts "a {colour} {shape} {position}", with the true colour and shape;
    - size: between "a small ..." and "a large {colour} {shape}".
    Returns {"n", "colour", "shape", "position", "size"} (rates).
    """

    def text_features(prompts):
        tokens = processor(text=prompts, padding="max_length", max_length=77, return_tensors="pt")
        return _unit(model.get_text_features(**tokens))

    labels = [(c, s) for c in COLOURS for s in SHAPES]
    text_embeds = text_features([f"a {c} {s}" for c, s in labels])
    sizes = ("small", "large")
    hits = defaultdict(list)
    for start in range(0, len(scenes), 200):
        chunk = scenes[start : start + 200]
        size = model.config.vision_config.image_size
        pixels = processor(images=[render_scene(s, size)["image"] for s in chunk],
                           return_tensors="pt").pixel_values
        image_embeds = _unit(model.get_image_features(pixel_values=pixels))
        best = (image_embeds @ text_embeds.T).argmax(1).tolist()
        for k, scene, image_embed in zip(best, chunk, image_embeds):
            colour, shape = labels[k]
            hits["colour"].append(colour == scene.colour)
            hits["shape"].append(shape == scene.shape)
            where = text_features([f"a {scene.colour} {scene.shape} {p}" for p in POSITIONS])
            hits["position"].append(int((where @ image_embed).argmax()) == scene.position)
            how_big = text_features([f"a {z} {scene.colour} {scene.shape}" for z in sizes])
            hits["size"].append(sizes[int((how_big @ image_embed).argmax())] == scene.size)
    return {"n": len(scenes), **_rates(hits)}


# ----------------------------------------------------------------------------- inpainting and depth
def object_region(image) -> np.ndarray:
    """The object as the judge finds it (far from the image's median colour, largest connected
    blob), with the edge put half-way between background and object colour, where a rendered
    scene's coverage is 0.5. Boolean (H, W)."""
    pixels = np.asarray(image.convert("RGB"), np.float32)
    bg = np.median(pixels.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(pixels - bg, axis=2)
    core = _largest_component(distance > OBJECT_THRESHOLD)
    if not core.any():
        return core
    contrast = np.linalg.norm(np.median(pixels[core], axis=0) - bg)
    return _largest_component(distance > 0.5 * contrast)


def psnr_outside(original, result, mask) -> float:
    """PSNR (dB, on 0-255) of `result` against `original` over the kept pixels (mask < 0.5)."""
    a = np.asarray(original.convert("RGB"), np.float64)
    b = np.asarray(result.convert("RGB"), np.float64)
    keep = np.asarray(mask) < 0.5
    mse = np.mean((a[keep] - b[keep]) ** 2) if keep.any() else 0.0
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def silhouette_iou(input_coverage, result) -> float:
    """IoU of the input's object (coverage >= 0.5) and the judge's object in the result."""
    return _mask_iou(np.asarray(input_coverage) >= 0.5, object_region(result))


def silhouette_references(cases, seed: int = 0) -> dict[str, float]:
    """The scale on which to read `silhouette_iou`, from renders alone (no model): the mean IoU of
    each case's input object against the same object rendered again, perfectly drawn but
    (`one_pixel_off`) with its centre moved one pixel in a random direction, or (`random_rotation`)
    at a random rotation. `cases` as from `depth_cases`; values in [0, 1]."""
    rng = random.Random(seed)
    shifted, rotated = [], []
    for _, coverage, _, scene in cases:
        a = np.asarray(coverage) >= 0.5
        side, angle = a.shape[0], rng.uniform(0, 2 * np.pi)
        moved = replace(scene, center=(scene.center[0] + np.cos(angle) / side,
                                       scene.center[1] + np.sin(angle) / side))
        turned = replace(scene, rotation=rng.uniform(0, 360))
        shifted.append(_mask_iou(a, render_scene(moved, side)["mask"] >= 0.5))
        rotated.append(_mask_iou(a, render_scene(turned, side)["mask"] >= 0.5))
    return {"one_pixel_off": float(np.mean(shifted)), "random_rotation": float(np.mean(rotated))}


def silhouette_by_shape(ious: list[float], shapes_seen: list, scenes: list[Scene]) -> dict[str, dict]:
    """The depth evaluation split by the input's shape: {"star": {"n", "silhouette_iou",
    "shape_right", "seen"}, ...}, where `shape_right` is how often the judge read the input's shape in
    the output and "seen" counts what it read (`shapes_seen`, one verdict per case; None where it
    found no object), as in `shape_by_size`."""
    out = {}
    for shape in SHAPES:
        mine = [i for i, s in enumerate(scenes) if s.shape == shape]
        row = _verdict_row([shapes_seen[i] for i in mine], shape)
        out[shape] = {"n": row["n"],
                      "silhouette_iou": float(np.mean([ious[i] for i in mine])) if mine else None,
                      "shape_right": row["right"], "seen": row["seen"]}
    return out


def _other(rng: random.Random, options, *avoid):
    return rng.choice([o for o in options if o not in avoid])


def inpainting_cases(n: int, seed: int = EVAL_SEED):
    """n cases (image, mask, prompt, wanted scene): replace a scene's object by another shape in
    another colour at the same place; the mask covers both objects, dilated by 2 pixels."""
    rng = random.Random(seed)
    cases = []
    for scene in grammar_prompts(n, seed):
        colour = _other(rng, COLOURS, scene.colour, scene.background)
        new = replace(scene, shape=_other(rng, SHAPES, scene.shape), colour=colour, rgb=COLOURS[colour])
        old, wanted = render_scene(scene), render_scene(new)
        mask = object_mask(np.maximum(old["mask"], wanted["mask"]), 2)
        cases.append((old["image"], mask, new.caption, new))
    return cases


def depth_cases(n: int, seed: int = EVAL_SEED + 1):
    """n cases (image, object coverage, prompt, wanted scene): the same shape in a new colour on a
    new background; the prompt names all five attributes."""
    rng = random.Random(seed)
    cases = []
    for scene in grammar_prompts(n, seed):
        colour = _other(rng, COLOURS, scene.colour, scene.background)
        background = _other(rng, BACKGROUNDS, colour, scene.background)
        new = replace(scene, colour=colour, rgb=COLOURS[colour], background=background,
                      background_rgb=BACKGROUNDS[background])
        render = render_scene(scene)
        cases.append((render["image"], render["mask"], new.caption, new))
    return cases
