"""scripts/make_figures.py draws the README's figure from the bundled model, with the judge's verdicts."""

import importlib.util

import pytest
from PIL import Image

from tests.conftest import ROOT


def _figures():
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_titles_name_the_wrong_attributes():
    figures = _figures()
    ok = {"size": True, "colour": True, "shape": True, "position": True, "background": True, "all": True}
    assert figures.verdict_title("a red star", ok) == "a red star | all right"
    wrong = {**ok, "shape": False, "background": False, "all": False}
    assert figures.verdict_title("a red star", wrong) == "a red star | wrong: shape, background"
    seen = {"shape": "triangle", "colour": "red"}  # the judge's readings; it found no background
    assert (figures.verdict_title("a red star", wrong, seen)
            == "a red star | wrong: shape (triangle), background (none)")


def test_figure_is_drawn_and_tallied(tmp_path, capsys):
    path = _figures().make_samples(tmp_path, n=2, steps=2)
    with Image.open(path) as im:
        assert im.width == 2 * 160 and im.height > 160  # two 160-pixel tiles, titles under them
    assert "all five attributes right in" in capsys.readouterr().out


def test_missing_models_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --models"):
        _figures().make_samples(tmp_path, n=1, steps=1, models=tmp_path)


def test_misses_figure_holds_exactly_the_prompts_the_judge_finds_wrong(tmp_path, capsys):
    import re

    # one sampling step draws no shape worth the name, so the judge finds most of these wrong
    path = _figures().make_misses(tmp_path, n=4, steps=1)
    tally = capsys.readouterr().out
    wrong = int(re.search(r"the judge finds (\d+) wrong", tally).group(1))
    assert wrong >= 1 and path is not None, tally
    with Image.open(path) as im:
        assert im.width == min(6, wrong) * 128  # one 128-pixel tile per miss, six to a row
    assert f"{wrong} images" in tally
