"""Measure the bundled mini Stable Diffusion against the course's targets; print the numbers.

    python scripts/evaluate.py                     # the full evaluation (a few minutes on 2 CPU cores)
    python scripts/evaluate.py --prompts 20 --images 50 --models /tmp/x   # quick look
    python scripts/evaluate.py --vae build/x/mini-sd/vae --no-save   # a candidate VAE, same UNet
    python scripts/evaluate.py --scheduler pndm --steps 50 --no-save  # what a plain pipe(prompt) gives
    python scripts/evaluate.py --partial --no-save  # captions that leave some attributes out

Everything is judged from pixels by utils/judge.py, on prompts and images the models never saw
(seeds distinct from training). Writes the numbers to <models>/mini-sd/metrics.json too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.evaluation import (  # noqa: E402
    TEXT2IMAGE_EVAL_SEED,
    clip_zero_shot,
    colour_by_colour,
    prompt_accuracy,
    shape_by_size,
    vae_roundtrip,
)
from utils.judge import ATTRIBUTES  # noqa: E402
from utils.seeding import make_generator  # noqa: E402
from utils.toyworld import grammar_prompts  # noqa: E402

TARGETS = {
    "prompts.all": 0.90, "prompts.colour": 0.97, "prompts.shape": 0.97,
    "vae.psnr": 30.0, **{f"vae.{a}": 0.99 for a in ATTRIBUTES},
    "clip.colour": 0.98, "clip.shape": 0.98, "speed.seconds_per_image": 2.0,
}
EVAL_SEED = TEXT2IMAGE_EVAL_SEED  # scenes drawn from this seed were never rendered for training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--images", type=int, default=500, help="images for the VAE and CLIP")
    parser.add_argument("--vae-more", type=int, default=2000,
                        help="further held-out images (another seed) for the VAE round trips alone: on "
                             "500 images one image is 0.2 points, so a 99%% target needs a second look")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--vae", type=Path, default=None,
                        help="evaluate with this VAE folder (and its scaling_factor) instead of the pipeline's own")
    parser.add_argument("--scheduler", choices=("dpm", "pndm"), default="dpm",
                        help="dpm: DPM-Solver++ (the evaluation's); pndm: the pipeline's own PNDM, what "
                             "pipe(prompt) uses (its default is 50 steps)")
    parser.add_argument("--partial", action="store_true",
                        help="captions that leave out some of size, colour, position and background, "
                             "each image judged on what its caption names")
    parser.add_argument("--no-save", action="store_true", help="don't write metrics.json")
    args = parser.parse_args()
    if args.vae is not None and not (args.vae / "config.json").exists():
        parser.error(f"--vae {args.vae}: no config.json there; give a folder saved by "
                     "AutoencoderKL.save_pretrained")
    for flag, used in (("--vae", args.vae is not None), ("--scheduler pndm", args.scheduler != "dpm"),
                       ("--partial", args.partial)):
        if used and not args.no_save:
            parser.error(f"{flag} measures another setting than metrics.json describes (the bundled model, "
                         "DPM-Solver++, full captions): add --no-save")

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    pipe = StableDiffusionPipeline.from_pretrained(args.models / "mini-sd", use_safetensors=True)
    if args.scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if args.vae is not None:
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    metrics: dict = {
        "setup": {
            "scheduler": ("DPMSolverMultistepScheduler (DPM-Solver++)" if args.scheduler == "dpm"
                          else type(pipe.scheduler).__name__), "steps": args.steps,
            "guidance_scale": args.guidance, "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        }
    }
    t0 = time.time()
    scenes = grammar_prompts(args.prompts, seed=EVAL_SEED, full=not args.partial)
    metrics["prompts"] = prompt_accuracy(pipe, scenes, args.steps, args.guidance, seed=EVAL_SEED,
                                         return_images=True)
    generated = metrics["prompts"].pop("images")
    breakdown = {"prompts": shape_by_size(generated, scenes)}
    metrics["colour_by_colour"] = colour_by_colour(generated, scenes)
    print(f"prompt accuracy done in {time.time() - t0:.0f} s", flush=True)

    # speed: one guided 25-step image at batch 1, the median of 3 after a warm-up
    times = []
    for i in range(4):
        start = time.perf_counter()
        pipe("a red star in the top left", num_inference_steps=args.steps,
             guidance_scale=args.guidance, generator=make_generator(i))
        times.append(time.perf_counter() - start)
    metrics["speed"] = {"seconds_per_image": float(sorted(times[1:])[1])}

    held_out = grammar_prompts(args.images, seed=EVAL_SEED + 1)
    metrics["vae"] = vae_roundtrip(pipe.vae, held_out, return_images=True)
    breakdown["vae"] = shape_by_size(metrics["vae"].pop("images"), held_out)
    if args.vae_more:
        more = grammar_prompts(args.vae_more, seed=EVAL_SEED + 77)
        metrics["vae_more"] = vae_roundtrip(pipe.vae, more, return_images=True)
        breakdown["vae_more"] = shape_by_size(metrics["vae_more"].pop("images"), more)
    metrics["shape_by_size"] = breakdown
    clip_dir = args.models / "mini-clip"
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32, use_safetensors=True).eval()
    metrics["clip"] = clip_zero_shot(clip, CLIPProcessor.from_pretrained(clip_dir), held_out)
    metrics["setup"]["seconds"] = round(time.time() - t0)

    print(f"\n{'metric':<28}{'value':>9}{'target':>9}  met")
    for group in ("prompts", "vae", "vae_more", "clip", "speed"):
        for key, value in metrics.get(group, {}).items():
            if key == "n":
                continue
            name = f"{group}.{key}"
            target = TARGETS.get(name.replace("vae_more.", "vae."))
            shown = f"{value:.2f}" if key.startswith(("psnr", "seconds")) else f"{value:.1%}"
            if target is None:
                met = ""
            elif name == "speed.seconds_per_image":
                met = "yes" if value <= target else "NO"
            else:
                met = "yes" if value >= target else "NO"
            goal = "" if target is None else (f"{target:.1f}" if target > 1 else f"{target:.0%}")
            print(f"{name:<28}{shown:>9}{goal:>9}  {met}")
    print(f"(n: {metrics['prompts']['n']} prompts ({'partial' if args.partial else 'full'} captions, "
          f"{metrics['setup']['scheduler']}, {args.steps} steps, guidance {args.guidance}), "
          f"{metrics['vae']['n']} images"
          + (f" (vae_more: {metrics['vae_more']['n']} more, another seed)" if args.vae_more else "") + "; "
          f"{metrics['setup']['seconds']} s on {metrics['setup']['machine']})")
    print("\nshape right, by size and shape (what the judge read instead):")
    for group, label in (("prompts", "generated"), ("vae", "VAE round trips"),
                         ("vae_more", "VAE round trips, the further images")):
        if group not in breakdown:
            continue
        print(f"  {label}")
        for key, row in breakdown[group].items():
            if row["n"]:
                wrong = ", ".join(f"{k} {v}" for k, v in row["seen"].items() if k != key.split()[1])
                print(f"    {key:<16}{row['right']:>6.0%} of {row['n']:<4}{wrong}")
    print("\ncolour right, by the colour asked for (generated; what the judge read instead):")
    for colour, row in metrics["colour_by_colour"].items():
        if row["n"]:
            wrong = ", ".join(f"{k or 'no object'} {v}" for k, v in row["seen"].items() if k != colour)
            print(f"    {colour:<16}{row['right']:>6.0%} of {row['n']:<4}{wrong}")
    if not args.no_save:
        path = args.models / "mini-sd" / "metrics.json"
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
