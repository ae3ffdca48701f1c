import random

import numpy as np
import pytest
from PIL import Image

from utils.evaluation import scene_attributes
from utils.judge import judge_image, parse_caption, score
from utils.toyworld import render_scene, sample_scene


def test_judge_reads_rendered_scenes():
    rng = random.Random(11)
    errors = {}
    n = 600
    for _ in range(n):
        scene = sample_scene(rng)
        seen = judge_image(render_scene(scene)["image"])
        for key, value in scene_attributes(scene).items():
            errors[key] = errors.get(key, 0) + (seen.get(key) != value)
    # the judge must be far better than the targets it is used to check (>= 99%)
    assert all(count / n <= 0.005 for count in errors.values()), errors


def test_judge_on_a_known_scene():
    scene = sample_scene(random.Random(0), shape="star", colour="red", size="large",
                         position="in the center", background="blue")
    seen = judge_image(render_scene(scene)["image"])
    assert (seen["shape"], seen["colour"], seen["size"], seen["position"], seen["background"]) == (
        "star", "red", "large", "in the center", "blue")


def test_blank_image_has_no_object():
    seen = judge_image(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert seen == {"background": "gray"}
    assert score(Image.new("RGB", (64, 64), (128, 128, 128)), "a red star")["all"] is False


def test_parse_caption():
    assert parse_caption("a red star") == {"colour": "red", "shape": "star"}
    assert parse_caption("an orange circle in the top left on a gray background") == {
        "colour": "orange", "shape": "circle", "position": "in the top left", "background": "gray"}
    assert parse_caption("a large square") == {"size": "large", "shape": "square"}
    with pytest.raises(ValueError, match="not in the toy-world grammar"):
        parse_caption("a photo of a cat")


def test_score_counts_only_what_was_asked():
    scene = sample_scene(random.Random(0), shape="circle", colour="green", background="white")
    image = render_scene(scene)["image"]
    assert score(image, "a green circle") == {"colour": True, "shape": True, "all": True}
    assert score(image, "a blue circle")["all"] is False


def test_judge_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        judge_image(np.zeros((8, 8)))


def test_shape_by_size_splits_the_verdicts():
    from dataclasses import replace

    from utils.evaluation import shape_by_size

    rng = random.Random(3)
    scenes = [sample_scene(rng, shape=shape, size=size)
              for shape in ("star", "square") for size in ("small", "large") for _ in range(2)]
    scenes = [replace(s, mention=(True, True, True, True)) for s in scenes]
    # a caption that does not ask for a size is left out of the table
    scenes.append(replace(sample_scene(rng, shape="circle", size="small"), mention=(False, True, True, True)))
    images = [render_scene(s)["image"] for s in scenes]
    # one small star drawn as a square: the table must say so, and nothing else changes
    images[0] = render_scene(replace(scenes[0], shape="square"))["image"]
    table = shape_by_size(images, scenes)
    assert list(table) == [f"{z} {s}" for z in ("small", "large") for s in ("circle", "square", "triangle", "star")]
    assert table["small star"] == {"n": 2, "right": 0.5, "seen": {"star": 1, "square": 1}}
    assert table["large star"]["right"] == 1.0 and table["small square"]["right"] == 1.0
    assert table["small circle"] == {"n": 0, "right": None, "seen": {}}


def test_colour_by_colour_splits_the_verdicts():
    from dataclasses import replace

    from utils.evaluation import colour_by_colour

    rng = random.Random(4)
    scenes = [sample_scene(rng, colour=colour, background="gray") for colour in ("yellow", "blue") for _ in range(2)]
    scenes = [replace(s, mention=(True, True, True, True)) for s in scenes]
    # a caption that does not ask for a colour is left out of the table
    scenes.append(replace(sample_scene(rng, colour="red", background="gray"), mention=(True, False, True, True)))
    images = [render_scene(s)["image"] for s in scenes]
    # one yellow object drawn red: the table must say so, and nothing else changes
    images[0] = render_scene(replace(scenes[0], colour="red", rgb=(220, 40, 40)))["image"]
    table = colour_by_colour(images, scenes)
    assert list(table) == ["red", "orange", "yellow", "green", "blue", "purple", "white", "black"]
    assert table["yellow"] == {"n": 2, "right": 0.5, "seen": {"yellow": 1, "red": 1}}
    assert table["blue"] == {"n": 2, "right": 1.0, "seen": {"blue": 2}}
    assert table["red"] == {"n": 0, "right": None, "seen": {}}
