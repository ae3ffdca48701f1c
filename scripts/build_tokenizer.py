"""Build the real CLIP BPE tokenizer (49,408 tokens) from the merges file in the open_clip_torch wheel.

    pip install --no-deps open_clip_torch   # only this script needs it; nothing imports it
    python scripts/build_tokenizer.py models/mini-sd/tokenizer

The vocabulary is built the way OpenAI's CLIP built it: the 256 byte characters, the same 256 with
`</w>`, one token per merge (lines 1..48894 of the merges file), then `<|startoftext|>` = 49406 and
`<|endoftext|>` = 49407. Padding uses `<|endoftext|>`, as Stable Diffusion 1.x does.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer

N_MERGES = 48894
VOCAB_SIZE = 49408
REFERENCE = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def find_merges_file() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locate, don't import (it needs torchvision)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "open_clip_torch is not installed: run `pip install --no-deps open_clip_torch` "
            "(only the merges file inside the wheel is used)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def build_tokenizer(merges_gz: Path) -> CLIPTokenizer:
    lines = gzip.open(merges_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        model_max_length=77,
    )
    check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer) -> None:
    """Raise unless this is the real CLIP tokenizer (the silent failures give 2-token ones)."""
    if len(tokenizer) != VOCAB_SIZE:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    text, ids = REFERENCE
    got = tokenizer(text).input_ids
    if got != ids:
        raise ValueError(f"{text!r} -> {got}, expected {ids}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to save the tokenizer into")
    parser.add_argument("--merges", type=Path, help="bpe_simple_vocab_16e6.txt.gz (default: open_clip's)")
    args = parser.parse_args()
    tokenizer = build_tokenizer(args.merges or find_merges_file())
    tokenizer.save_pretrained(args.out)
    print(f"saved the CLIP tokenizer ({len(tokenizer)} tokens) to {args.out}")


if __name__ == "__main__":
    main()
