import importlib.util
import sys

import pytest
from transformers import CLIPTokenizer

from tests.conftest import MINI_SD, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from build_tokenizer import build_tokenizer, check_tokenizer, find_merges_file  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(MINI_SD / "tokenizer")


def test_bundled_tokenizer_is_real_clip(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        49406, 49407, 49407)


def test_padding_and_truncation(tokenizer):
    ids = tokenizer("a red star", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:5] == [49406, 320, 736, 1565, 49407] and set(ids[4:]) == {49407}
    long = tokenizer("a red star " * 40, padding="max_length", max_length=77, truncation=True)
    assert len(long.input_ids) == 77 and long.input_ids[-1] == 49407


def test_check_tokenizer_catches_the_silent_2_token_failure():
    broken = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    with pytest.raises(ValueError, match="49408"):
        check_tokenizer(broken)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                    reason="open_clip_torch not installed (scripts/setup.sh --dev installs it)")
def test_build_from_merges_matches_the_bundled_tokenizer(tokenizer):
    built = build_tokenizer(find_merges_file())
    text = "a large purple triangle in the bottom right on a yellow background, a photo of a cat!"
    assert built(text).input_ids == tokenizer(text).input_ids
    assert built.get_vocab() == tokenizer.get_vocab()
