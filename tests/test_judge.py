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
