"""Build the bundled inpainting and depth-to-image models from the bundled mini-sd.

    python scripts/build_mini_tasks.py                        # every stage into models/
    python scripts/build_mini_tasks.py inpaint assemble       # some stages only
    python scripts/build_mini_tasks.py evaluate               # measure what is in models/
    python scripts/build_mini_tasks.py inpaint --transfer-from OLD_MODELS --transfer-base OLD_BASE_UNET
                                  # start from task UNets made on an older mini-sd (the model cards)
    python scripts/build_mini_tasks.py --smoke --out /tmp/x   # the CPU smoke run the tests use

Made the way SD's inpainting and depth models were made: start from the text-to-image UNet, add
input channels whose conv_in weights are zero (so that training starts from exactly the
text-to-image model), and fine-tune on toy-world images with the extra inputs.

Stages, each resumable (a stage whose output exists is skipped; a stage that was cut off resumes
from its checkpoint in --work):
  1. inpaint          9-channel UNet: 4 noisy latents + 1 mask + 4 masked-image latents; random
                      masks (boxes, blobs, dilated object masks, whole image), the scene's caption
  2. depth_estimator  a tiny DPTForDepthEstimation (64x64 in, 64x64 out), L1 on toy-world depth
  3. depth_unet       5-channel UNet: 4 noisy latents + 1 depth: the toy world's true depth map or
                      (half the batches) the DPT's prediction, prepared exactly as
                      StableDiffusionDepth2ImgPipeline prepares DPT's output
  4. assemble         StableDiffusionInpaintPipeline -> <out>/mini-sd-inpainting and
                      StableDiffusionDepth2ImgPipeline -> <out>/mini-sd-depth, fp16 safetensors on
                      disk (float32 configs); text encoder, tokenizer and VAE byte-identical copies
                      of mini-sd's (git stores identical files once)
  5. evaluate         the targets' metrics, printed and written to <model>/metrics.json

Both UNets: v-prediction on SD's 1000-step scaled-linear schedule (as mini-sd), 10% caption dropout,
EMA of the weights. Runs on CUDA when there is one (bf16 autocast, larger batches), else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from build_mini_sd import (  # noqa: E402
    IMAGE_SIZE,
    SD_SCHEDULE,
    Trainer,
    log,
    to_model_input,
)

from utils.evaluation import (  # noqa: E402
    depth_cases,
    inpainting_cases,
    psnr_outside,
    silhouette_by_shape,
    silhouette_iou,
    silhouette_references,
)
from utils.inputs import depth_to_latent_size  # noqa: E402
from utils.masks import binarize, mask_to_latent_size, masked_image, random_mask  # noqa: E402
from utils.toyworld import (  # noqa: E402
    caption_for,
    make_scenes,
    render_scene,
)

STAGES = ("inpaint", "depth_estimator", "depth_unet", "assemble", "evaluate")
INPAINT_DIR, DEPTH_DIR = "mini-sd-inpainting", "mini-sd-depth"
TARGETS = {
    "inpainting.psnr_outside": 30.0, "inpainting.colour_and_shape": 0.85,
    "depth.silhouette_iou": 0.8, "depth.colour": 0.90,
}


@dataclass
class Config:
    base: str = str(ROOT / "models" / "mini-sd")  # the text-to-image pipeline to start from
    n_images: int = 20_000
    seed: int = 2  # the foundation used seeds 0 and 1
    inpaint_steps: int = 4_000
    inpaint_batch: int = 64
    depth_steps: int = 4_500
    depth_batch: int = 64
    unet_lr: float = 2e-4
    conv_in_lr_mult: float = 5.0  # conv_in (which holds the new, zero-initialised channels) learns faster
    unet_init: str = ""  # a widened UNet folder to continue from instead of widening the base's UNet
    # move task UNets fine-tuned from an older base onto this base before training (task arithmetic):
    transfer_from: str = ""  # a models folder holding those task UNets (<folder>/mini-sd-inpainting/unet, ...)
    transfer_base: str = ""  # the UNet folder of the older base they were fine-tuned from
    dpt_steps: int = 3_000
    dpt_batch: int = 64
    dpt_lr: float = 2e-3
    depth_from_estimator: float = 0.5  # share of depth-UNet batches whose depth is DPT's prediction
    depth_layout_mention: float = 0.25  # depth captions name size / position this often (the map has them)
    depth_timesteps: str = "cubic"  # "uniform", or "cubic": more high-noise steps, where layout is decided
    caption_dropout: float = 0.1
    mention_prob: float = 0.75
    ema_decay: float = 0.999
    checkpoint_every: int = 100
    eval_n: int = 100
    eval_steps: int = 25
    eval_guidance: float = 7.5
    depth_strength: float = 0.8  # the depth pipeline's default


SMOKE = dict(n_images=64, inpaint_steps=3, inpaint_batch=8, depth_steps=3, depth_batch=8,
             dpt_steps=3, dpt_batch=8, checkpoint_every=2, eval_n=2, eval_steps=2)
# on a GPU: bigger batches and more samples (not yet run: measure steps/s first)
CUDA = dict(n_images=60_000, inpaint_steps=6_000, inpaint_batch=512, depth_steps=4_000,
            depth_batch=512, dpt_steps=3_000, dpt_batch=256)


# ----------------------------------------------------------------------------- data
def stage_data(cfg: Config, work: Path):
    """Scenes and their renders (images, object coverage, depth), rendered once and cached."""
    cache = work / f"toyworld_tasks_{cfg.n_images}_{cfg.seed}.npz"
    scenes = make_scenes(cfg.n_images, cfg.seed)
    if cache.exists():
        data = np.load(cache)
        return scenes, data["images"], data["coverage"], data["depth"]
    t0 = time.time()
    renders = [render_scene(s, IMAGE_SIZE) for s in scenes]
    images = np.stack([np.asarray(r["image"]) for r in renders])
    coverage = np.stack([np.round(r["mask"] * 255).astype(np.uint8) for r in renders])
    depth = np.stack([r["depth"] for r in renders]).astype(np.float16)
    np.savez(cache, images=images, coverage=coverage, depth=depth)
    log(f"rendered {len(scenes)} toy-world scenes (image, mask, depth) in {time.time() - t0:.0f} s")
    return scenes, images, coverage, depth


def load_base(cfg: Config, device):
    """Tokenizer, text encoder, VAE and UNet of the text-to-image pipeline, frozen except the UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = Path(cfg.base)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    assert len(tokenizer) == 49408, f"broken tokenizer in {base} ({len(tokenizer)} tokens)"
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32)
    for model in (text_encoder, vae):
        model.to(device).eval().requires_grad_(False)
    return tokenizer, text_encoder, vae, unet


def widen_conv_in(unet, in_channels: int):
    """A copy of `unet` with `in_channels` inputs: the first 4 input channels keep the text-to-image
    weights, the extra ones start at zero (as SD's inpainting and depth UNets were initialised), so
    the new UNet's output equals the old one's until training moves the new weights."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config["in_channels"] = in_channels
    wide = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    old = state["conv_in.weight"]  # (C, 4, 3, 3)
    weight = torch.zeros(old.shape[0], in_channels, *old.shape[2:], dtype=old.dtype)
    weight[:, : old.shape[1]] = old
    state["conv_in.weight"] = weight
    wide.load_state_dict(state)
    return wide


def unet_trainer(name, cfg, unet, steps, work, device):
    """A Trainer with an EMA of the weights kept in its checkpoint."""
    unet = unet.to(device).train()
    conv_in = [p for n, p in unet.named_parameters() if n.startswith("conv_in.")]
    rest = [p for n, p in unet.named_parameters() if not n.startswith("conv_in.")]
    groups = [{"params": rest}, {"params": conv_in, "lr_mult": cfg.conv_in_lr_mult}]
    trainer = Trainer(name, unet, steps, cfg.unet_lr, work, device, cfg.checkpoint_every, groups)
    ema = [e.to(device) for e in trainer.extra["ema"]] if "ema" in trainer.extra else [
        p.detach().clone() for p in unet.parameters()]
    trainer.extra["ema"] = ema

    def ema_update(step):
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1 - decay)

    def finish():
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                p.copy_(e)
        return unet.eval()

    return trainer, ema_update, finish


def train_unet(name, cfg, unet, steps, work, device, loss_fn, target: Path, stage: str, label: str):
    """Train `unet` on `loss_fn` (resumable, with an EMA of the weights), save the EMA weights to
    `target` and record the stage's settings; returns the UNet holding the EMA weights."""
    trainer, ema_update, finish = unet_trainer(name, cfg, unet, steps, work, device)
    trainer.run(loss_fn, after_step=ema_update)
    finish().save_pretrained(target)
    record(target.parent, stage, cfg)
    log(f"{label} UNet (EMA weights) saved to {target}")
    return unet


def encode_prompts(tokenizer, text_encoder, captions, device):
    tokens = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids.to(device)
    return text_encoder(tokens)[0]


def captions_for(idx, scenes, rng: random.Random, cfg: Config, layout_mention: float | None = None) -> list[str]:
    """The scenes' captions (random mentions, as mini-sd was trained), 10% dropped for CFG.
    `layout_mention`: another probability for mentioning size and position (default mention_prob)."""
    captions = []
    for i in idx:
        if rng.random() < cfg.caption_dropout:
            captions.append("")
            continue
        p = cfg.mention_prob if layout_mention is None else layout_mention
        size, colour, position, background = (rng.random() < q for q in (p, cfg.mention_prob, p, cfg.mention_prob))
        captions.append(caption_for(replace(scenes[i], mention=(size, colour, position, background))))
    return captions


def transfer_task(base_unet, task_unet, task_base_unet):
    """`base_unet` + (`task_unet` - `task_base_unet`): a task UNet fine-tuned from an older base,
    moved onto a newer base of the same architecture (task arithmetic, Ilharco et al., 2023). Every
    weight keeps what the fine-tuning added to the old base; the input channels that only the task
    UNet has (conv_in's mask or depth channels) are copied as they are. Float32."""
    from diffusers import UNet2DConditionModel

    new, old = base_unet.state_dict(), task_base_unet.state_dict()
    task = task_unet.state_dict()
    def same_but_inputs(a, b):  # equal shapes, conv_in.weight's input channels aside
        return a.shape == b.shape or (a.dim() == 4 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:])

    if (new.keys() != old.keys() or new.keys() != task.keys()
            or any(new[k].shape != old[k].shape for k in new)
            or any(not same_but_inputs(task[k], old[k]) if k == "conv_in.weight" else task[k].shape != old[k].shape
                   for k in task)):
        raise ValueError("the two bases (or the task UNet) differ in architecture: task arithmetic needs "
                         "the same layers and shapes everywhere but conv_in's input channels")
    state = {}
    for key, weight in task.items():
        weight, was, now = weight.float().cpu(), old[key].float().cpu(), new[key].float().cpu()
        if weight.shape != was.shape:  # conv_in.weight (C, 4 + extra, 3, 3)
            weight = weight.clone()
            weight[:, : was.shape[1]] = now + (weight[:, : was.shape[1]] - was)
            state[key] = weight
        else:
            state[key] = now + (weight - was)
    moved = UNet2DConditionModel.from_config(task_unet.config)
    moved.load_state_dict(state)
    return moved.float()


def initial_unet(cfg: Config, base_unet, in_channels: int, folder: str):
    """The UNet a stage starts from: `cfg.unet_init` if given (an earlier run's widened UNet); or,
    with `cfg.transfer_from`, that folder's task UNet moved onto the base (`transfer_task`); else
    the base's UNet widened with zero-initialised input channels."""
    from diffusers import UNet2DConditionModel

    if cfg.transfer_from:
        if cfg.unet_init or not cfg.transfer_base:
            raise ValueError("--transfer-from needs --transfer-base (the older base's UNet folder) "
                             "and no --unet-init")
        source = Path(cfg.transfer_from) / folder / "unet"
        task = UNet2DConditionModel.from_pretrained(source, torch_dtype=torch.float32)
        old_base = UNet2DConditionModel.from_pretrained(cfg.transfer_base, torch_dtype=torch.float32)
        if task.config.in_channels != in_channels:
            raise ValueError(f"{source} has {task.config.in_channels} input channels, this stage needs {in_channels}")
        log(f"starting from {source} moved onto the base: base + (it - {cfg.transfer_base})")
        return transfer_task(base_unet, task, old_base)
    if not cfg.unet_init:
        return widen_conv_in(base_unet, in_channels)

    unet = UNet2DConditionModel.from_pretrained(cfg.unet_init, torch_dtype=torch.float32)
    if unet.config.in_channels != in_channels:
        raise ValueError(f"--unet-init {cfg.unet_init} has {unet.config.in_channels} input channels, "
                         f"this stage needs {in_channels}")
    log(f"starting from the UNet in {cfg.unet_init}")
    return unet


# ----------------------------------------------------------------------------- stages
def sample_timesteps(n: int, gen, device, how: str = "uniform") -> torch.Tensor:
    """n training timesteps in [0, 999]: uniform, or "cubic", t = 1000 (1 - u^3), which puts half
    of them above t = 875 (T2I-Adapter's choice for structure conditions: the layout of an image is
    decided in the high-noise steps)."""
    if how == "uniform":
        return torch.randint(0, 1000, (n,), generator=gen, device=device)
    if how == "cubic":
        u = torch.rand(n, generator=gen, device=device)
        return ((1 - u**3) * 1000).long().clamp(0, 999)
    raise ValueError(f"unknown timestep sampling {how!r}; choose 'uniform' or 'cubic'")


def v_loss(unet, scheduler, latents, extra, prompt_embeds, gen, timesteps: str = "uniform"):
    """The v-prediction loss at random timesteps, with `extra` (B, k, h, w) concatenated to the
    noisy latents (B, 4, h, w) as the widened UNet's additional input channels."""
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    t = sample_timesteps(len(latents), gen, latents.device, timesteps)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(torch.cat([noisy, extra], dim=1), t, prompt_embeds).sample
    return F.mse_loss(pred.float(), scheduler.get_velocity(latents, noise, t))


def stage_inpaint(cfg: Config, out: Path, work: Path, data, device):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    target = out / INPAINT_DIR / "unet"
    if (target / "diffusion_pytorch_model.safetensors").exists():
        return UNet2DConditionModel.from_pretrained(target, torch_dtype=torch.float32)
    scenes, images, coverage, _ = data
    tokenizer, text_encoder, vae, base_unet = load_base(cfg, device)
    torch.manual_seed(cfg.seed)
    unet = initial_unet(cfg, base_unet, 9, INPAINT_DIR)
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction")
    scaling = vae.config.scaling_factor
    rng, np_rng = random.Random(cfg.seed + 10), np.random.default_rng(cfg.seed + 10)
    gen = torch.Generator(device).manual_seed(cfg.seed + 10)
    n_train = len(images)

    def loss_fn(step):
        idx = [rng.randrange(n_train) for _ in range(cfg.inpaint_batch)]
        with torch.no_grad():
            prompt_embeds = encode_prompts(tokenizer, text_encoder, captions_for(idx, scenes, rng, cfg), device)
            pixels = to_model_input(images[idx], device)  # (B, 3, 64, 64) in [-1, 1]
            masks = np.stack([random_mask(np_rng, IMAGE_SIZE, coverage[i] / 255.0)[0] for i in idx])
            masks = torch.from_numpy(masks)[:, None].to(device)  # (B, 1, 64, 64), 1 = repaint
            # as the pipeline: binarise, keep image * (mask < 0.5), encode both with sampling
            both = torch.cat([pixels, masked_image(pixels, masks)])
            both = vae.encode(both).latent_dist.sample(gen) * scaling
            latents, masked_latents = both.chunk(2)  # (B, 4, 8, 8) each
            mask_small = mask_to_latent_size(masks)  # (B, 1, 8, 8), nearest
        extra = torch.cat([mask_small, masked_latents], dim=1)  # (B, 5, 8, 8): UNet input 9 channels
        return v_loss(unet, scheduler, latents, extra, prompt_embeds, gen)

    return train_unet("inpaint_unet", cfg, unet, cfg.inpaint_steps, work, device, loss_fn, target, "inpaint",
                      "inpainting")


def dpt_model():
    """A tiny non-hybrid DPT: ViT (patch 8, hidden 32, 4 layers) on 64x64 images, 64x64 depth out."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=64, is_hybrid=False,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 64, 64],
        reassemble_factors=[2, 1, 0.5, 0.25], fusion_hidden_size=32,
    )
    return DPTForDepthEstimation(config)


def dpt_processor():
    """DPT's processor for 64x64 images: resize to 64x64, x / 127.5 - 1 (mean = std = 0.5)."""
    from transformers import DPTImageProcessor

    return DPTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def balanced_l1(pred, true, on_object) -> torch.Tensor:
    """L1 with the object's pixels and the background's weighted alike, image by image. (Objects
    cover about 6% of an image: with a plain L1 a first DPT learnt the background ramp alone, MAE
    0.04 overall but 0.62 on the object.)"""
    error = (pred - true).abs()
    obj = on_object.float()
    per_image = lambda w: (error * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1)  # noqa: E731
    return 0.5 * (per_image(obj) + per_image(1 - obj)).mean()


def stage_depth_estimator(cfg: Config, out: Path, work: Path, data, device):
    from transformers import DPTForDepthEstimation

    target = out / DEPTH_DIR / "depth_estimator"
    if (target / "model.safetensors").exists():
        return DPTForDepthEstimation.from_pretrained(target, dtype=torch.float32)
    _, images, coverage, depth = data
    torch.manual_seed(cfg.seed)
    model = dpt_model().to(device).train()
    rng = np.random.default_rng(cfg.seed + 20)

    def loss_fn(step):
        idx = rng.integers(0, len(images), cfg.dpt_batch)
        pixels = to_model_input(images[idx], device)  # what dpt_processor() gives for these images
        true = torch.from_numpy(depth[idx].astype(np.float32)).to(device)  # (B, 64, 64)
        pred = model(pixel_values=pixels).predicted_depth.float()  # (B, 64, 64), >= 0 (ReLU)
        return balanced_l1(pred, true, torch.from_numpy(coverage[idx] >= 128).to(device))

    trainer = Trainer("dpt", model, cfg.dpt_steps, cfg.dpt_lr, work, device, cfg.checkpoint_every)
    trainer.run(loss_fn)
    model.eval().save_pretrained(target)
    dpt_processor().save_pretrained(out / DEPTH_DIR / "feature_extractor")
    record(target.parent, "depth_estimator", cfg)
    log(f"depth estimator saved to {target}")
    return model


def stage_depth_unet(cfg: Config, out: Path, work: Path, data, device):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    target = out / DEPTH_DIR / "unet"
    if (target / "diffusion_pytorch_model.safetensors").exists():
        return UNet2DConditionModel.from_pretrained(target, torch_dtype=torch.float32)
    scenes, images, _, depth = data
    estimator = None
    if cfg.depth_from_estimator > 0:  # SD 2's depth model saw MiDaS predictions, not true depth
        from transformers import DPTForDepthEstimation

        folder = out / DEPTH_DIR / "depth_estimator"
        if not (folder / "model.safetensors").exists():
            raise FileNotFoundError(f"{folder} is missing: run the depth_estimator stage first "
                                    "(or pass --depth-from-estimator 0)")
        estimator = DPTForDepthEstimation.from_pretrained(folder, dtype=torch.float32)
        estimator = estimator.to(device).eval().requires_grad_(False)
    tokenizer, text_encoder, vae, base_unet = load_base(cfg, device)
    torch.manual_seed(cfg.seed)
    unet = initial_unet(cfg, base_unet, 5, DEPTH_DIR)
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction")
    scaling = vae.config.scaling_factor
    rng = random.Random(cfg.seed + 30)
    gen = torch.Generator(device).manual_seed(cfg.seed + 30)

    def loss_fn(step):
        idx = [rng.randrange(len(images)) for _ in range(cfg.depth_batch)]
        with torch.no_grad():
            captions = captions_for(idx, scenes, rng, cfg, cfg.depth_layout_mention)
            prompt_embeds = encode_prompts(tokenizer, text_encoder, captions, device)
            latents = vae.encode(to_model_input(images[idx], device)).latent_dist.sample(gen) * scaling
            depth_map = torch.from_numpy(depth[idx].astype(np.float32)).to(device)  # (B, 64, 64)
            if estimator is not None and rng.random() < cfg.depth_from_estimator:
                pixels = to_model_input(images[idx], device)  # = dpt_processor()'s pixel_values
                depth_map = estimator(pixel_values=pixels).predicted_depth.float()
            depth_small = depth_to_latent_size(depth_map, IMAGE_SIZE, IMAGE_SIZE)  # (B, 1, 8, 8)
        # UNet input 5 channels
        return v_loss(unet, scheduler, latents, depth_small, prompt_embeds, gen, cfg.depth_timesteps)

    return train_unet("depth_unet", cfg, unet, cfg.depth_steps, work, device, loss_fn, target, "depth_unet",
                      "depth")


def record(folder: Path, stage: str, cfg: Config) -> None:
    """Add a stage's settings to <folder>/build_config.json (stages may run with different flags)."""
    path = folder / "build_config.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    settings = asdict(cfg)
    for key in ("base", "unet_init"):  # paths inside the repository are recorded relative to it
        if settings[key] and Path(settings[key]).resolve().is_relative_to(ROOT):
            settings[key] = Path(settings[key]).resolve().relative_to(ROOT).as_posix()
    done[stage] = settings
    path.write_text(json.dumps(done, indent=2) + "\n")


def _to_fp16(folder: Path) -> None:
    """Rewrite a folder's safetensors in fp16 (configs stay float32, so loading gives float32)."""
    from safetensors.torch import load_file, save_file

    for weights in folder.rglob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})


def _copy_shared(base: Path, target: Path) -> None:
    """mini-sd's text encoder, tokenizer and VAE, byte for byte (one blob each in git)."""
    for part in ("text_encoder", "tokenizer", "vae"):
        shutil.rmtree(target / part, ignore_errors=True)
        shutil.copytree(base / part, target / part)


def weights_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1e6


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def stage_assemble(cfg: Config, out: Path, device):
    from diffusers import (
        PNDMScheduler,
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import DPTForDepthEstimation

    base = Path(cfg.base)
    tokenizer, text_encoder, vae, _ = load_base(cfg, "cpu")
    scheduler = PNDMScheduler.from_pretrained(base / "scheduler")
    shared = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    for name, make in (
        (INPAINT_DIR, lambda unet: StableDiffusionInpaintPipeline(
            **shared, unet=unet, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)),
        (DEPTH_DIR, lambda unet: StableDiffusionDepth2ImgPipeline(
            **shared, unet=unet,
            depth_estimator=DPTForDepthEstimation.from_pretrained(out / DEPTH_DIR / "depth_estimator",
                                                                  dtype=torch.float32),
            feature_extractor=dpt_processor())),
    ):
        target = out / name
        if (target / "model_index.json").exists():
            continue
        needs = [target / "unet"] + ([target / "depth_estimator"] if name == DEPTH_DIR else [])
        if not all(p.is_dir() for p in needs):
            log(f"{name}: not assembled, its stages have not run ({', '.join(map(str, needs))})")
            continue
        unet = UNet2DConditionModel.from_pretrained(target / "unet", torch_dtype=torch.float32)
        make(unet).save_pretrained(target, safe_serialization=True)
        _to_fp16(target)
        _copy_shared(base, target)
        record(target, "assemble", cfg)
        log(f"pipeline saved to {target}: {weights_mb(target):.1f} MB of weights")
    # what the repository would bundle: the base's siblings (mini-sd, mini-clip) and the new folders
    folders = {p.name: p for p in sorted(base.parent.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    folders.update({n: out / n for n in (INPAINT_DIR, DEPTH_DIR) if (out / n).is_dir()})
    log("sizes, MB (weights / whole folder): "
        + ", ".join(f"{n} {weights_mb(p):.1f} / {folder_mb(p):.1f}" for n, p in folders.items())
        + f"; together {sum(map(weights_mb, folders.values())):.1f}"
        + f" / {sum(map(folder_mb, folders.values())):.1f}")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_inpainting(pipe, n: int, steps: int = 25, guidance: float = 7.5, batch: int = 25) -> dict:
    from PIL import Image

    from utils.images import latents_to_pil, pil_to_latents
    from utils.judge import judge_image
    from utils.seeding import make_generator

    cases = inpainting_cases(n)
    psnrs, vae_psnrs, oracle_psnrs, colour, shape = [], [], [], [], []
    for start in range(0, n, batch):
        chunk = cases[start : start + batch]
        images = pipe(
            prompt=[c[2] for c in chunk], image=[c[0] for c in chunk],
            mask_image=[Image.fromarray((c[1] * 255).astype(np.uint8), "L") for c in chunk],
            num_inference_steps=steps, guidance_scale=guidance,
            generator=[make_generator(start + i) for i in range(len(chunk))],
        ).images
        # ceilings on the same pixels: the VAE's own round trip of the input, and an oracle latent
        # inpainter (the input's latents in the kept cells, the wanted scene's in the repainted ones)
        latents = pil_to_latents([c[0] for c in chunk], pipe.vae)
        wanted_latents = pil_to_latents([render_scene(c[3])["image"] for c in chunk], pipe.vae)
        masks = torch.from_numpy(np.stack([c[1] for c in chunk]).astype(np.float32))[:, None]
        repaint = mask_to_latent_size(binarize(masks)).to(latents)
        roundtrips = latents_to_pil(latents, pipe.vae)
        oracles = latents_to_pil(repaint * wanted_latents + (1 - repaint) * latents, pipe.vae)
        for (original, mask, _, wanted), result, roundtrip, oracle in zip(chunk, images, roundtrips, oracles):
            psnrs.append(psnr_outside(original, result, mask))
            vae_psnrs.append(psnr_outside(original, roundtrip, mask))
            oracle_psnrs.append(psnr_outside(original, oracle, mask))
            seen = judge_image(result)
            colour.append(seen.get("colour") == wanted.colour)
            shape.append(seen.get("shape") == wanted.shape)
    both = np.logical_and(colour, shape)
    return {"n": n, "psnr_outside": float(np.mean(psnrs)), "psnr_outside_min": float(np.min(psnrs)),
            "psnr_outside_vae_roundtrip": float(np.mean(vae_psnrs)),
            "psnr_outside_oracle": float(np.mean(oracle_psnrs)),
            "colour": float(np.mean(colour)), "shape": float(np.mean(shape)),
            "colour_and_shape": float(np.mean(both))}


@torch.no_grad()
def evaluate_depth(pipe, n: int, steps: int = 25, guidance: float = 7.5, strength: float = 0.8,
                   batch: int = 25) -> dict:
    from utils.judge import judge_image
    from utils.seeding import make_generator

    cases = depth_cases(n)
    ious, colour, shapes_seen, depth_mae, object_mae = [], [], [], [], []
    processor, estimator = pipe.feature_extractor, pipe.depth_estimator
    for start in range(0, n, batch):
        chunk = cases[start : start + batch]
        images = pipe(
            prompt=[c[2] for c in chunk], image=[c[0] for c in chunk], strength=strength,
            num_inference_steps=steps, guidance_scale=guidance,
            generator=[make_generator(start + i) for i in range(len(chunk))],
        ).images
        pixels = processor(images=[c[0] for c in chunk], return_tensors="pt").pixel_values
        predicted = estimator(pixels.to(estimator.device, estimator.dtype)).predicted_depth
        true = torch.from_numpy(np.stack([render_scene(c[3])["depth"] for c in chunk]))
        error = (predicted.float().cpu() - true).abs()
        depth_mae += error.mean((1, 2)).tolist()
        on_object = torch.from_numpy(np.stack([c[1] for c in chunk])) >= 0.5
        object_mae += [e[m].mean().item() for e, m in zip(error, on_object)]
        for (_, coverage, _, wanted), result in zip(chunk, images):
            verdict = judge_image(result)
            ious.append(silhouette_iou(coverage, result))
            colour.append(verdict.get("colour") == wanted.colour)
            shapes_seen.append(verdict.get("shape"))
    return {"n": n, "strength": strength, "silhouette_iou": float(np.mean(ious)),
            "silhouette_iou_min": float(np.min(ious)), "colour": float(np.mean(colour)),
            "depth_estimator_mae": float(np.mean(depth_mae)),
            "depth_estimator_mae_object": float(np.mean(object_mae)),
            "by_shape": silhouette_by_shape(ious, shapes_seen, [c[3] for c in cases]),
            "references": silhouette_references(cases)}


def stage_evaluate(cfg: Config, out: Path, device="cpu", save: bool = True) -> dict:
    import platform

    from diffusers import (
        DPMSolverMultistepScheduler,
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionInpaintPipeline,
    )

    setup = {"scheduler": "DPMSolverMultistepScheduler (DPM-Solver++)", "steps": cfg.eval_steps,
             "guidance_scale": cfg.eval_guidance, "torch_threads": torch.get_num_threads(),
             "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
    results = {}
    for name, cls, key in ((INPAINT_DIR, StableDiffusionInpaintPipeline, "inpainting"),
                           (DEPTH_DIR, StableDiffusionDepth2ImgPipeline, "depth")):
        if not (out / name / "model_index.json").exists():
            log(f"{out / name} is not assembled yet: skipped")
            continue
        t0 = time.time()
        pipe = cls.from_pretrained(out / name, use_safetensors=True).to(device)  # float32
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if key == "inpainting":
            metrics = evaluate_inpainting(pipe, cfg.eval_n, cfg.eval_steps, cfg.eval_guidance)
        else:
            metrics = evaluate_depth(pipe, cfg.eval_n, cfg.eval_steps, cfg.eval_guidance,
                                     cfg.depth_strength)
        metrics["seconds"] = round(time.time() - t0, 1)
        results[key] = metrics
        if save:
            (out / name / "metrics.json").write_text(
                json.dumps({"setup": setup, key: metrics}, indent=2) + "\n")
    print(f"\n{'metric':<40}{'value':>9}{'target':>9}  met")
    for key, metrics in results.items():
        for metric, value in metrics.items():
            if metric in ("n", "seconds", "strength") or isinstance(value, dict):
                continue
            name = f"{key}.{metric}"
            target = TARGETS.get(name)
            ratio = "iou" in metric  # an IoU is a ratio of areas, not a share of cases: no percent sign
            shown = (f"{value:.2f}" if "psnr" in metric or "mae" in metric
                     else f"{value:.3f}" if ratio else f"{value:.1%}")
            goal = "" if target is None else (f"{target:.1f}" if target > 1 or ratio else f"{target:.0%}")
            met = "" if target is None else ("yes" if value >= target else "NO")
            print(f"{name:<40}{shown:>9}{goal:>9}  {met}")
        print(f"({key}: n = {metrics['n']}, {metrics['seconds']} s)")
    if "depth" in results:
        depth = results["depth"]
        print("\ndepth, by the input's shape: silhouette IoU, and how often the judge reads that shape")
        for shape, row in depth["by_shape"].items():
            if row["n"]:
                instead = ", ".join(f"{k} {v}" for k, v in row["seen"].items() if k != shape)
                print(f"  {shape:<10} n = {row['n']:>3}   IoU {row['silhouette_iou']:.3f}   "
                      f"shape right {row['shape_right']:.0%}" + (f"   read as: {instead}" if instead else ""))
        ref = depth["references"]
        print(f"for scale (renders, no model): a perfect copy one pixel off gets IoU {ref['one_pixel_off']:.3f}, "
              f"at a random rotation {ref['random_rotation']:.3f}")
    return results


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", metavar="STAGE",
                        help=f"stages to run (default: all of {', '.join(STAGES)})")
    parser.add_argument("--out", type=Path, default=ROOT / "models", help="models folder")
    parser.add_argument("--work", type=Path, default=None,
                        help="checkpoints and caches (default build/, or <out>/.work with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests (< 90 s on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier outputs and checkpoints")
    parser.add_argument("--no-save", action="store_true", help="evaluate without writing metrics.json")
    for field, value in asdict(Config()).items():
        if isinstance(value, (int, float, str)):
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = Config(**{**(CUDA if device.type == "cuda" and not args.smoke else {}),
                    **(SMOKE if args.smoke else {})})
    for field in asdict(cfg):
        value = getattr(args, field, None)
        if value is not None:
            setattr(cfg, field, value)
    work = args.work or (args.out / ".work" if args.smoke else ROOT / "build")
    stages = args.stages or list(STAGES)
    if args.fresh:
        for name in ("inpaint_unet", "depth_unet", "dpt"):
            (work / f"{name}_checkpoint.pt").unlink(missing_ok=True)
        for name in (INPAINT_DIR, DEPTH_DIR):
            shutil.rmtree(args.out / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"stages {stages} into {args.out} on {device} with {json.dumps(asdict(cfg))}")
    t0 = time.time()

    data = stage_data(cfg, work) if {"inpaint", "depth_estimator", "depth_unet"} & set(stages) else None
    if "inpaint" in stages:
        stage_inpaint(cfg, args.out, work, data, device)
        log(f"inpaint done at {time.time() - t0:.0f} s")
    if "depth_estimator" in stages:
        stage_depth_estimator(cfg, args.out, work, data, device)
        log(f"depth_estimator done at {time.time() - t0:.0f} s")
    if "depth_unet" in stages:
        stage_depth_unet(cfg, args.out, work, data, device)
        log(f"depth_unet done at {time.time() - t0:.0f} s")
    if "assemble" in stages:
        stage_assemble(cfg, args.out, device)
    if "evaluate" in stages:
        stage_evaluate(cfg, args.out, device, save=not args.no_save)
    log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
