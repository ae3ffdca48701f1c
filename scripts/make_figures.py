"""Draw the figures of the bundled model.

mini_sd_samples.png (the README's): the first N grammar prompts of a fixed seed, not picked, each
generated once (prompt i with seed i) and labelled with the judge's verdict.
mini_sd_misses.png (the model card's): every prompt of the evaluation (scripts/evaluate.py: its 200
prompts, its seeds) that the judge finds wrong, labelled with what the judge read instead.

    python scripts/make_figures.py                 # writes both into images/, prints the tallies
    python scripts/make_figures.py --n 4 --misses 0 --out /tmp/figs   # the samples only, 4 of them

The evaluation's settings: 25 DPM-Solver++ steps, guidance 7.5, 64x64, float32 on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIGURE = "mini_sd_samples.png"
MISSES = "mini_sd_misses.png"
SEED = 2026  # the prompts' seed; distinct from the evaluation's and from training's


def verdict_title(caption: str, verdict: dict[str, bool], seen: dict | None = None) -> str:
    """The caption, then "all right" or the attributes the judge found wrong (with what it read
    instead, when its readings `seen` are given)."""
    wrong = [k if seen is None else f"{k} ({seen.get(k, 'none')})" for k, ok in verdict.items()
             if k != "all" and not ok]
    return f"{caption} | " + ("all right" if verdict["all"] else "wrong: " + ", ".join(wrong))


def _generate(models: Path | None, n: int, prompt_seed: int, steps: int, seed: int):
    """The first n grammar prompts of `prompt_seed`, prompt i generated with seed `seed + i` the way
    scripts/evaluate.py generates (DPM-Solver++, guidance 7.5, float32), each judged from its pixels:
    (scenes, images, verdicts)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from utils.evaluation import prompt_accuracy
    from utils.judge import score
    from utils.toyworld import grammar_prompts

    folder = (models or ROOT / "models") / "mini-sd"
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no pipeline in {folder}: pass --models, the folder that holds mini-sd/")
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    scenes = grammar_prompts(n, seed=prompt_seed)
    images = prompt_accuracy(pipe, scenes, steps, 7.5, seed=seed, return_images=True)["images"]
    return scenes, images, [score(im, s.attributes) for im, s in zip(images, scenes)]


def make_samples(out: Path, n: int = 12, steps: int = 25, models: Path | None = None, cols: int = 4) -> Path:
    """Generate, judge and save the grid; return the PNG's path and print the judge's tally."""
    from utils import image_grid

    scenes, images, verdicts = _generate(models, n, SEED, steps, seed=0)  # prompt i with seed i
    titles = [verdict_title(s.caption, v) for s, v in zip(scenes, verdicts)]
    out.mkdir(parents=True, exist_ok=True)
    path = out / FIGURE
    image_grid(images, cols=min(cols, n), titles=titles, tile=160).save(path, optimize=True)
    right = sum(v["all"] for v in verdicts)
    print(f"{path}: {n} prompts (grammar_prompts({n}, seed={SEED}), prompt i with seed i), "
          f"{steps} DPM-Solver++ steps, guidance 7.5; all five attributes right in {right} of {n}")
    return path


def make_misses(out: Path, n: int = 200, steps: int = 25, models: Path | None = None,
                cols: int = 6) -> Path | None:
    """Generate the evaluation's first n prompts as scripts/evaluate.py does, and save a grid of the
    ones the judge finds wrong, each titled with what it read instead; return the PNG's path (None,
    and no file, when nothing is wrong) and print the tally."""
    from utils import image_grid
    from utils.evaluation import TEXT2IMAGE_EVAL_SEED as EVAL_SEED
    from utils.judge import judge_image

    scenes, images, verdicts = _generate(models, n, EVAL_SEED, steps, seed=EVAL_SEED)
    missed = [(s, im, v) for s, im, v in zip(scenes, images, verdicts) if not v["all"]]
    print(f"{n} prompts of the evaluation (grammar_prompts({n}, seed={EVAL_SEED}), prompt i with seed "
          f"{EVAL_SEED} + i), {steps} DPM-Solver++ steps, guidance 7.5: the judge finds {len(missed)} wrong")
    if not missed:
        return None
    titles = [verdict_title(s.caption, v, judge_image(im)) for s, im, v in missed]
    out.mkdir(parents=True, exist_ok=True)
    path = out / MISSES
    image_grid([im for _, im, _ in missed], cols=min(cols, len(missed)), titles=titles, tile=128).save(
        path, optimize=True)
    print(f"{path}: {len(missed)} images")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "images", help="folder for the PNGs")
    parser.add_argument("--n", type=int, default=12, help="number of prompts in the samples figure")
    parser.add_argument("--misses", type=int, default=200,
                        help="number of the evaluation's prompts whose misses to draw (0: no misses figure)")
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    parser.add_argument("--models", type=Path, default=None, help="folder holding mini-sd/ (default: models/)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.misses < 0:
        parser.error("--n and --steps must be at least 1, --misses at least 0")
    make_samples(args.out, args.n, args.steps, args.models)
    if args.misses:
        make_misses(args.out, args.misses, args.steps, args.models)


if __name__ == "__main__":
    main()
