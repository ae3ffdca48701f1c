"""Draw the README's figure of the bundled model: the first N grammar prompts of a fixed seed, not
picked, each generated once (prompt i with seed i) and labelled with the judge's verdict.

    python scripts/make_figures.py                 # writes images/mini_sd_samples.png, prints the tally
    python scripts/make_figures.py --n 4 --out /tmp/figs

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
SEED = 2026  # the prompts' seed; distinct from the evaluation's and from training's


def verdict_title(caption: str, verdict: dict[str, bool]) -> str:
    """The caption, then "all right" or the attributes the judge found wrong."""
    wrong = [k for k, ok in verdict.items() if k != "all" and not ok]
    return f"{caption} | " + ("all right" if verdict["all"] else "wrong: " + ", ".join(wrong))


def make_samples(out: Path, n: int = 12, steps: int = 25, models: Path | None = None, cols: int = 4) -> Path:
    """Generate, judge and save the grid; return the PNG's path and print the judge's tally."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from utils import image_grid
    from utils.evaluation import prompt_accuracy
    from utils.judge import score
    from utils.toyworld import grammar_prompts

    folder = (models or ROOT / "models") / "mini-sd"
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no pipeline in {folder}: pass --models, the folder that holds mini-sd/")
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    scenes = grammar_prompts(n, seed=SEED)
    # the evaluation's own generation (scripts/evaluate.py): prompt i with seed i, judged from pixels
    images = prompt_accuracy(pipe, scenes, steps, 7.5, seed=0, return_images=True)["images"]
    verdicts = [score(im, s.attributes) for im, s in zip(images, scenes)]
    titles = [verdict_title(s.caption, v) for s, v in zip(scenes, verdicts)]
    out.mkdir(parents=True, exist_ok=True)
    path = out / FIGURE
    image_grid(images, cols=min(cols, n), titles=titles, tile=160).save(path, optimize=True)
    right = sum(v["all"] for v in verdicts)
    print(f"{path}: {n} prompts (grammar_prompts({n}, seed={SEED}), prompt i with seed i), "
          f"{steps} DPM-Solver++ steps, guidance 7.5; all five attributes right in {right} of {n}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "images", help="folder for the PNG")
    parser.add_argument("--n", type=int, default=12, help="number of prompts")
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    parser.add_argument("--models", type=Path, default=None, help="folder holding mini-sd/ (default: models/)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        parser.error("--n and --steps must be at least 1")
    make_samples(args.out, args.n, args.steps, args.models)


if __name__ == "__main__":
    main()
