import random
import re

import numpy as np
import pytest

from utils.toyworld import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_RANGES,
    caption_for,
    grammar_prompts,
    make_dataset,
    render_scene,
    sample_scene,
)

GRAMMAR = re.compile(
    r"^an? (?:(small|large) )?(?:(\w+) )?(circle|square|triangle|star)"
    r"(?: (in the top left|at the top|in the top right|on the left|in the center|on the right|"
    r"in the bottom left|at the bottom|in the bottom right))?(?: on an? (\w+) background)?$"
)


def test_palette_is_the_required_one():
    assert COLOURS["red"] == (220, 40, 40) and COLOURS["black"] == (25, 25, 25)
    assert list(BACKGROUNDS) == [*COLOURS, "gray"] and BACKGROUNDS["gray"] == (128, 128, 128)
    assert SHAPES == ("circle", "square", "triangle", "star")
    assert len(POSITIONS) == 9


def test_same_seed_same_images_and_captions():
    scenes_a, images_a = make_dataset(20, seed=7)
    scenes_b, images_b = make_dataset(20, seed=7)
    _, images_c = make_dataset(20, seed=8)
    assert [s.caption for s in scenes_a] == [s.caption for s in scenes_b]
    assert np.array_equal(images_a, images_b)
    assert not np.array_equal(images_a, images_c)
    assert images_a.shape == (20, 64, 64, 3) and images_a.dtype == np.uint8


def test_captions_follow_the_grammar():
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(500)]
    partial = 0
    for scene in scenes:
        match = GRAMMAR.match(scene.caption)
        assert match, scene.caption
        assert scene.background != scene.colour
        # 'an' exactly before a vowel
        for article, word in re.findall(r"\b(an?) (\w+)", scene.caption):
            assert (article == "an") == (word[0] in "aeiou"), scene.caption
        partial += not all(scene.mention)
    assert 0.3 * len(scenes) < partial < len(scenes)  # some captions leave attributes out


def test_full_caption_and_article():
    scene = sample_scene(random.Random(0), shape="star", colour="orange", size="large",
                         position="in the top left", background="gray",
                         mention=(True, True, True, True))
    assert caption_for(scene) == "a large orange star in the top left on a gray background"
    scene = sample_scene(random.Random(0), shape="circle", colour="orange", background="white",
                         mention=(False, True, False, True))
    assert caption_for(scene) == "an orange circle on a white background"
    scene = sample_scene(random.Random(0), colour="red", background="orange",
                         mention=(False, False, False, True))
    assert caption_for(scene).endswith("on an orange background")


def test_render_outputs_and_geometry():
    rng = random.Random(3)
    for _ in range(50):
        scene = sample_scene(rng)
        out = render_scene(scene)
        mask, depth = out["mask"], out["depth"]
        assert out["image"].size == (64, 64) and out["image"].mode == "RGB"
        assert mask.shape == depth.shape == (64, 64)
        assert 0 <= mask.min() and mask.max() <= 1 and mask.max() > 0.99
        assert 0 <= depth.min() and depth.max() <= 1
        # nearer (larger) depth where the object is
        assert depth[mask > 0.99].mean() > depth[mask < 0.01].mean()
        # the object lies inside its grid cell and inside the image
        row, col = divmod(scene.position, 3)
        cx, cy = scene.center
        assert col / 3 <= cx < (col + 1) / 3 and row / 3 <= cy < (row + 1) / 3
        lo, hi = SIZE_RANGES[scene.size]
        assert lo <= scene.diameter <= hi
        assert scene.diameter / 2 <= min(cx, cy, 1 - cx, 1 - cy) + 1e-9


def test_bad_attributes_are_clear_errors():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        sample_scene(rng, shape="hexagon")
    with pytest.raises(ValueError, match="own colour"):
        sample_scene(rng, colour="red", background="red")
    with pytest.raises(ValueError, match=r"unknown position 'somewhere'; choose a grid index 0..8 or one of \['in"):
        sample_scene(rng, position="somewhere")
    with pytest.raises(ValueError, match="position must be 0..8"):
        sample_scene(rng, position=9)


def test_grammar_prompts_name_every_attribute():
    scenes = grammar_prompts(30, seed=1)
    assert all(all(s.mention) for s in scenes)
    assert grammar_prompts(30, seed=1) == scenes
