"""Rebuild the bundled miniature Stable Diffusion from nothing.

    python scripts/build_mini_sd.py                       # full build into models/mini-sd (+ models/mini-clip)
    python scripts/build_mini_sd.py --smoke --out /tmp/x  # the CPU smoke run the tests use (< 2 min)

Stages, each resumable (a stage whose output exists is skipped; a stage that was cut off resumes from
its last checkpoint in --work):
  1. tokenizer  the real CLIP BPE tokenizer, from open_clip's merges file (scripts/build_tokenizer.py)
  2. data       toy-world images rendered once and cached
  3. clip       a small CLIPModel (text + vision towers): the vision tower warmed up to read the
                toy world's attributes, then locked while the text tower and both projections
                train contrastively (LiT), on batches of hard negatives; with --clip-init it
                continues an earlier CLIP, and with --clip-lock-text 1 that CLIP's text tower
                stays as it was (the UNet reads it) while the vision side learns
  4. vae        an AutoencoderKL (8x per side, 4 latent channels, KL-regularised); its scaling
                factor = 1 / std of the latents, as SD's 0.18215 was computed; with --vae-init
                it continues an earlier VAE, and with --vae-decoder-only 1 only its decoder learns
                (encoder, latents and scaling factor kept, so UNets trained on them still fit);
                --vae-layers N with an earlier VAE of fewer layers per block makes it deeper, its
                new blocks starting as identities (load_deeper; the bundled VAE's phases 16 and 18)
  5. unet       a UNet2DConditionModel trained on the frozen CLIP text encoder's hidden states, the
                1000-step scaled-linear schedule, v-prediction, 10% caption dropout; with --unet-init
                it continues an earlier UNet, and --unet-layers N with one of fewer layers per block
                makes it deeper, its new layers starting as identities (load_deeper_unet)
  6. assemble   a StableDiffusionPipeline with SD's PNDM scheduler, saved as fp16 safetensors

Runs on CUDA when there is one (bf16 autocast; the batch sizes stay the same unless you pass
--unet-batch and the like), else on the CPU.
Evaluate the result with scripts/evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from build_tokenizer import build_tokenizer, find_merges_file  # noqa: E402

from utils.toyworld import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    caption_for,
    make_dataset,
    make_scenes,
)

IMAGE_SIZE = 64
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


@dataclass
class Config:
    n_images: int = 60_000
    seed: int = 0
    text_hidden: int = 64
    text_layers: int = 3
    vision_layers: int = 3
    clip_steps: int = 2_000
    clip_batch: int = 256
    clip_lr: float = 1e-3
    clip_patch: int = 8
    clip_group: int = 16
    vision_warmup_steps: int = 1_500
    vision_warmup_lr: float = 1e-3
    vision_position_std: float = 1.0
    clip_lock_vision: int = 1
    clip_lock_text: int = 0
    vae_channels: tuple = (16, 32, 64, 64)
    vae_steps: int = 3_000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_hard_weight: float = 1.0
    vae_decoder_only: int = 0
    vae_layers: int = 1
    unet_channels: tuple = (64, 128, 128)
    unet_layers: int = 1
    unet_steps: int = 4_500
    unet_batch: int = 128
    unet_lr: float = 4e-4
    unet_small_weight: float = 1.0
    unet_object_weight: float = 1.0
    caption_dropout: float = 0.1
    mention_prob: float = 0.75
    prediction_type: str = "v_prediction"
    ema_decay: float = 0.999
    checkpoint_every: int = 250


SMOKE = dict(
    n_images=512, clip_steps=10, clip_batch=64, vision_warmup_steps=5, vae_steps=10, vae_batch=16, unet_steps=10,
    unet_batch=32, checkpoint_every=5,
)


# ----------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 5% of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def random_mention(scene: Scene, rng: random.Random, mention_prob: float) -> Scene:
    """The scene with a fresh random choice of what its caption mentions."""
    mention = tuple(rng.random() < mention_prob for _ in range(4))
    return Scene(**{**asdict(scene), "mention": mention})


def random_caption(scene: Scene, rng: random.Random, mention_prob: float) -> str:
    return caption_for(random_mention(scene, rng, mention_prob))


def describes(caption_scene: Scene, scene: Scene) -> bool:
    """True when every attribute `caption_scene`'s caption mentions is true of `scene`."""
    size_on, colour_on, position_on, background_on = caption_scene.mention
    return (caption_scene.shape == scene.shape
            and (not size_on or caption_scene.size == scene.size)
            and (not colour_on or caption_scene.colour == scene.colour)
            and (not position_on or caption_scene.position == scene.position)
            and (not background_on or caption_scene.background == scene.background))


def contrastive_targets(captioned: list[Scene], scenes: list[Scene]) -> torch.Tensor:
    """(captions, images) 0/1 matrix: caption i is right for image j when it describes scene j.

    A partial caption ("a red star") is right for every red star in the batch, so it must not be
    pushed away from them: CLIP's one-hot targets would teach the encoders false negatives.
    """
    return torch.tensor([[describes(c, s) for s in scenes] for c in captioned], dtype=torch.float32)


# CLIP's hard negatives: groups of training images that agree on everything but one or two attributes
HARD_NEGATIVE_KEYS = {
    "shape, size and position": ("colour", "background"),
    "position": ("shape", "colour", "size", "background"),
    "shape": ("colour", "size", "position", "background"),
}


def hard_negative_groups(scenes: list[Scene]) -> list[list[list[int]]]:
    """For each entry of HARD_NEGATIVE_KEYS, the scene indices grouped by the attributes it fixes."""
    keyings = []
    for fixed in HARD_NEGATIVE_KEYS.values():
        groups: dict[tuple, list[int]] = {}
        for i, scene in enumerate(scenes):
            groups.setdefault(tuple(getattr(scene, a) for a in fixed), []).append(i)
        pairs = [g for g in groups.values() if len(g) > 1]
        if pairs:  # a tiny (smoke) dataset may have no two scenes that differ only in shape
            keyings.append(pairs)
    return keyings


def grouped_batch(keyings: list[list[list[int]]], batch: int, group: int,
                  rng: random.Random) -> list[int]:
    """`batch` indices drawn `group` at a time, each time from one group of one keying: images
    that differ only in the attributes that keying leaves free (shape, or position, or shape,
    size and position), so the loss can only fall by reading those attributes."""
    idx: list[int] = []
    while len(idx) < batch:
        members = rng.choice(rng.choice(keyings))
        idx += [rng.choice(members) for _ in range(min(group, batch - len(idx)))]
    return idx


def to_model_input(images_uint8: np.ndarray, device) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(images_uint8).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


class Trainer:
    """One resumable training loop: model + AdamW + checkpoint every few steps."""

    def __init__(self, name, model, cfg_steps, lr, work: Path, device, every: int, param_groups=None):
        """`param_groups`: optional AdamW groups, each may carry an "lr_mult" (times the schedule's
        learning rate); default one group of every trainable parameter."""
        self.name, self.model, self.total, self.base_lr = name, model, cfg_steps, lr
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2)
        self.ckpt = work / f"{name}_checkpoint.pt"
        self.device, self.every, self.step, self.extra = device, every, 0, {}
        if self.ckpt.exists():
            state = torch.load(self.ckpt, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.step, self.extra = state["step"], state.get("extra", {})
            log(f"{name}: resumed from step {self.step}")

    def save(self) -> None:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                 "step": self.step, "extra": self.extra}
        torch.save(state, self.ckpt.with_suffix(".tmp"))
        self.ckpt.with_suffix(".tmp").replace(self.ckpt)

    def run(self, loss_fn, after_step=None):
        bar = tqdm(total=self.total, initial=self.step, desc=self.name, mininterval=5)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        smooth = None
        while self.step < self.total:
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.step, self.total, self.base_lr) * group.get("lr_mult", 1.0)
            with autocast:
                loss = loss_fn(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            if after_step:
                after_step(self.step)
            self.step += 1
            smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
            if self.step % self.every == 0 or self.step == self.total:
                self.save()
        bar.close()
        return smooth


# ----------------------------------------------------------------------------- stages
def stage_tokenizer(out: Path):
    target = out / "mini-sd" / "tokenizer"
    if not (target / "tokenizer.json").exists():
        build_tokenizer(find_merges_file()).save_pretrained(target)
        log(f"tokenizer saved to {target}")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(target)


def as_loaded(tokenizer):
    """The tokenizer as saved by stage_tokenizer: calls with padding and truncation leave their
    settings in a tokenizer's saved config (transformers 5.24), which must not reach the models."""
    return type(tokenizer).from_pretrained(tokenizer.name_or_path)


def stage_data(cfg: Config, work: Path):
    cache = work / f"toyworld_{cfg.n_images}_{cfg.seed}.npz"
    if cache.exists():
        return make_scenes(cfg.n_images, cfg.seed), np.load(cache)["images"]
    t0 = time.time()
    scenes, images = make_dataset(cfg.n_images, seed=cfg.seed, image_size=IMAGE_SIZE)
    np.savez(cache, images=images)
    log(f"rendered {len(images)} toy-world images in {time.time() - t0:.0f} s")
    return scenes, images


def clip_configs(cfg: Config, tokenizer):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=cfg.text_hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=cfg.clip_patch, hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=4, projection_dim=cfg.text_hidden,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=cfg.text_hidden)


def clip_pixels(images_uint8: np.ndarray, device) -> torch.Tensor:
    x = torch.from_numpy(images_uint8).to(device).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(CLIP_MEAN, device=device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=device)[:, None, None]
    return (x - mean) / std


ATTRIBUTE_CLASSES = {"shape": SHAPES, "colour": list(COLOURS), "size": SIZES,
                     "position": list(range(9)), "background": list(BACKGROUNDS)}


class VisionWarmup(torch.nn.Module):
    """CLIP's vision tower with one linear head per toy-world attribute (heads dropped after)."""

    def __init__(self, vision_model, hidden: int):
        super().__init__()
        self.vision_model = vision_model
        self.heads = torch.nn.ModuleDict(
            {name: torch.nn.Linear(hidden, len(classes)) for name, classes in ATTRIBUTE_CLASSES.items()})

    def forward(self, pixel_values):
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return {name: head(pooled) for name, head in self.heads.items()}


def attribute_labels(batch_scenes: list[Scene], device) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([list(classes).index(getattr(s, name)) for s in batch_scenes],
                               device=device) for name, classes in ATTRIBUTE_CLASSES.items()}


def warm_up_vision(cfg: Config, model, work: Path, scenes, images, n_train: int, device,
                   fresh: bool = True):
    """Pre-train the image tower to read the attributes from pixels (LiT's recipe: a supervised
    image tower, then contrastive training of the text tower against it).

    Why: trained contrastively from scratch, both towers sit at a saddle for shape and position.
    Neither encodes them, so neither gets a gradient to start: 2,000 steps learnt colour and size
    and left position at chance (cosine 1.00 between the nine positions, both towers).
    """
    if fresh:  # a strong position signal in every patch: the object is a few patches
        with torch.no_grad():
            model.vision_model.embeddings.position_embedding.weight.normal_(std=cfg.vision_position_std)
    warm = VisionWarmup(model.vision_model, cfg.text_hidden).to(device).train()
    rng = random.Random(cfg.seed + 4)

    def loss_fn(step):
        idx = [rng.randrange(n_train) for _ in range(cfg.clip_batch)]
        logits = warm(clip_pixels(images[idx], device))
        labels = attribute_labels([scenes[i] for i in idx], device)
        return sum(F.cross_entropy(logits[k].float(), labels[k]) for k in logits)

    trainer = Trainer("clip_vision", warm, cfg.vision_warmup_steps, cfg.vision_warmup_lr, work, device,
                      cfg.checkpoint_every)
    trainer.run(loss_fn)
    return warm


def stage_clip(cfg: Config, out: Path, work: Path, tokenizer, scenes, images, device,
               init: Path | None = None):
    """With `init` (an earlier mini-clip folder) the CLIP continues from its weights; with
    cfg.clip_lock_text its text tower, the one mini-sd's UNet reads, stays exactly as it was
    (only its projection learns), so that a better vision tower needs no new UNet."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    target = out / "mini-clip"
    if (target / "model.safetensors").exists():
        return CLIPModel.from_pretrained(target, dtype=torch.float32)
    if init is not None:
        model = CLIPModel.from_pretrained(init, dtype=torch.float32).to(device).train()
        log(f"clip: starting from the weights in {init}")
    elif cfg.clip_lock_text:
        raise ValueError("--clip-lock-text 1 keeps the text tower of an earlier CLIP: give --clip-init")
    else:
        torch.manual_seed(cfg.seed)
        model = CLIPModel(clip_configs(cfg, tokenizer)).to(device).train()
    rng = random.Random(cfg.seed + 1)
    n_train = len(images) - min(1000, len(images) // 8)
    if cfg.vision_warmup_steps:
        warm_up_vision(cfg, model, work, scenes, images, n_train, device, fresh=init is None)
    if cfg.clip_lock_vision:  # LiT: the image tower stays as warmed up; its projection still learns
        model.vision_model.requires_grad_(False).eval()
    if cfg.clip_lock_text:  # the reverse: the text tower stays, its projection still learns
        model.text_model.requires_grad_(False).eval()

    keyings = hard_negative_groups(scenes[:n_train])

    def loss_fn(step):
        if cfg.clip_group > 1 and keyings:
            idx = grouped_batch(keyings, cfg.clip_batch, cfg.clip_group, rng)
        else:
            idx = [rng.randrange(n_train) for _ in range(cfg.clip_batch)]
        captioned = [random_mention(scenes[i], rng, cfg.mention_prob) for i in idx]
        # padded to the longest caption, not to 77: the attention is causal, so padding changes
        # neither the caption's token states nor the pooled end-of-text state, and costs 5x
        tokens = tokenizer([c.caption for c in captioned], padding="longest", max_length=77,
                           truncation=True, return_tensors="pt").to(device)
        outputs = model(input_ids=tokens.input_ids, pixel_values=clip_pixels(images[idx], device))
        logits = outputs.logits_per_text.float()  # (B captions, B images)
        right = contrastive_targets(captioned, [scenes[i] for i in idx]).to(device)
        return 0.5 * (
            torch.sum(-(right / right.sum(1, keepdim=True)) * F.log_softmax(logits, 1), 1).mean()
            + torch.sum(-(right.T / right.T.sum(1, keepdim=True)) * F.log_softmax(logits.T, 1),
                        1).mean()
        )

    trainer = Trainer("clip", model, cfg.clip_steps, cfg.clip_lr, work, device, cfg.checkpoint_every)
    trainer.run(loss_fn)
    model.eval()
    if not cfg.clip_lock_text:
        _zero_unused_token_rows(model.text_model, tokenizer, scenes, cfg)
    model.save_pretrained(target)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_mean=CLIP_MEAN, image_std=CLIP_STD,
        ),
        tokenizer=as_loaded(tokenizer),
    )
    processor.save_pretrained(target)
    log(f"CLIP saved to {target}")
    return model


def _zero_unused_token_rows(text_model, tokenizer, scenes, cfg) -> None:
    """Rows of the 49,408-token table that training never touched stay random: zero them.

    Every word outside the toy-world grammar then maps to the same (zero) token vector, which is
    honest (the model never learned it) and keeps the file compressible.
    """
    rng = random.Random(0)
    used = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for scene in scenes:
        used.update(tokenizer(random_caption(scene, rng, 1.0)).input_ids)
        used.update(tokenizer(random_caption(scene, rng, 0.0)).input_ids)
    grammar = [*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, *POSITIONS, "a an on background"]
    used.update(tokenizer(" ".join(grammar)).input_ids)
    table = text_model.embeddings.token_embedding.weight
    keep = torch.zeros(table.shape[0], dtype=torch.bool)
    keep[sorted(used)] = True
    with torch.no_grad():
        table[~keep.to(table.device)] = 0
    log(f"token table: kept {int(keep.sum())} trained rows of {table.shape[0]}")


def vae_model(cfg: Config):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=cfg.vae_layers, norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def edge_weight(x: torch.Tensor) -> torch.Tensor:
    """1 on flat regions, 5 within a pixel of an edge: sharp small shapes matter most."""
    gray = x.mean(1, keepdim=True)
    dx = F.pad((gray[..., :, 1:] - gray[..., :, :-1]).abs(), (0, 1, 0, 0))
    dy = F.pad((gray[..., 1:, :] - gray[..., :-1, :]).abs(), (0, 0, 0, 1))
    edges = ((dx + dy) > 0.05).float()
    return 1 + 4 * F.max_pool2d(edges, 3, stride=1, padding=1)


def load_into_deeper(model, theirs: dict, what: str, keep: str) -> list[str]:
    """Load the state dict `theirs` of an earlier, shallower model into `model`; every weight of theirs
    must fit one of `model`'s exactly. Returns `model`'s weights it did not hold (its new layers')."""
    ours = model.state_dict()
    misfits = [k for k, v in theirs.items() if k not in ours or ours[k].shape != v.shape]
    if misfits:
        raise ValueError(f"the earlier {what} has weights this one lacks or shapes otherwise: {misfits[:3]}; "
                         f"only layers_per_block may differ (keep {keep})")
    return model.load_state_dict(theirs, strict=False).missing_keys


def load_deeper(vae, earlier) -> list[str]:
    """Load `earlier`'s weights into `vae`, an AutoencoderKL with more ResNet blocks per level
    (`layers_per_block`) and otherwise the same shape. Every block `earlier` lacks is appended after
    its blocks at that level and starts as an exact identity (its convolutions zeroed: the block adds
    0 to its input), so `vae` computes what `earlier` did (the encoder bit for bit, the decoder up to
    float rounding) until it trains: the
    encoder's new blocks then stay identities while it is frozen (--vae-decoder-only 1), so the
    latents and every UNet trained on them stay valid, and the decoder's new blocks are its added
    depth. Returns the names of the new blocks."""
    missing = load_into_deeper(vae, earlier.state_dict(), "VAE", "--vae-channels")
    new = sorted({name.rsplit(".", 2)[0] for name in missing})
    modules = dict(vae.named_modules())
    for name in new:
        block = modules[name]
        if not name.split(".")[-1].isdigit() or block.in_channels != block.out_channels:
            raise ValueError(f"{name}: only same-width ResNet blocks can start as identities")
        with torch.no_grad():
            for conv in ((block.conv1, block.conv2) if name.startswith("encoder") else (block.conv2,)):
                conv.weight.zero_()
                conv.bias.zero_()
    return new


def vae_sample_weights(scenes, hard: float) -> np.ndarray:
    """Sampling probabilities of the training scenes for the VAE: small stars and small triangles
    `hard` times as likely as a large shape, other small shapes half-way ((1 + hard) / 2). Their
    points are what an 8x8x4 latent loses first; `hard` = 1 is uniform sampling."""
    small = np.array([s.size == "small" for s in scenes])
    pointed = np.array([s.shape in ("star", "triangle") for s in scenes])
    weights = np.where(small & pointed, hard, np.where(small, (1 + hard) / 2, 1.0))
    return weights / weights.sum()


def unet_sample_weights(scenes, small: float) -> np.ndarray:
    """Sampling probabilities of the training scenes for the UNet: small shapes `small` times as
    likely as large ones (the generated shapes that come out wrong are mostly small ones);
    `small` = 1 is uniform sampling."""
    weights = np.where(np.array([s.size == "small" for s in scenes]), small, 1.0)
    return weights / weights.sum()


def object_weight_map(scenes, weight: float, side: int) -> torch.Tensor:
    """Per-latent-pixel loss weights (N, 1, side, side): `weight` on the cells that the object's
    circumscribed disc reaches into, 1 elsewhere. A small shape touches 4-9 of an 8x8 latent's 64
    cells, so a plain mean spends ~90% of the UNet's loss on flat background; `weight` = 1 is the
    plain mean."""
    grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side  # cell centres, fractions of the side
    cx = torch.tensor([s.center[0] for s in scenes]).view(-1, 1, 1)
    cy = torch.tensor([s.center[1] for s in scenes]).view(-1, 1, 1)
    radius = torch.tensor([s.diameter / 2 for s in scenes]).view(-1, 1, 1)
    # distance from the disc's centre to the nearest point of each cell
    dx = ((grid.view(1, 1, -1) - cx).abs() - 0.5 / side).clamp(min=0)
    dy = ((grid.view(1, -1, 1) - cy).abs() - 0.5 / side).clamp(min=0)
    return torch.where(dx**2 + dy**2 < radius**2, weight, 1.0).unsqueeze(1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error with per-pixel `weights` (N, 1, H, W) normalised to average 1 over the batch
    (the loss's scale, and so the learning rate's meaning, stays that of the plain mean)."""
    if weights is None:
        return F.mse_loss(pred, target)
    weights = weights.expand_as(pred)
    return (weights * (pred - target) ** 2).sum() / weights.sum()


def stage_vae(cfg: Config, out: Path, work: Path, scenes, images, device, init: Path | None = None):
    from diffusers import AutoencoderKL

    target = out / "mini-sd" / "vae"
    if (target / "diffusion_pytorch_model.safetensors").exists():
        return AutoencoderKL.from_pretrained(target)
    torch.manual_seed(cfg.seed)
    vae = vae_model(cfg)
    if init is not None:  # continue training an earlier VAE (a fresh optimizer)
        earlier = AutoencoderKL.from_pretrained(init).float()
        if earlier.config.layers_per_block > cfg.vae_layers:
            raise ValueError(f"--vae-init {init} has {earlier.config.layers_per_block} layers per block: "
                             f"pass --vae-layers {earlier.config.layers_per_block} (or more) to continue it")
        if earlier.config.layers_per_block < cfg.vae_layers:  # a deeper decoder, same encoder
            new = load_deeper(vae, earlier)
            log(f"vae: {len(new)} ResNet blocks added as identities ({', '.join(new[:2])}, ...)")
        else:
            vae.load_state_dict(earlier.state_dict())
        vae.register_to_config(scaling_factor=earlier.config.scaling_factor)
        log(f"vae: starting from the weights in {init}")
    elif cfg.vae_decoder_only:
        raise ValueError("--vae-decoder-only 1 fine-tunes the decoder of an earlier VAE: give --vae-init")
    vae = vae.to(device).train()
    if cfg.vae_decoder_only:
        # SD's ft-MSE recipe: the encoder (and so every latent, the scaling factor, and every UNet
        # trained on those latents) stays exactly as it was; only the decoder learns
        for part in (vae.encoder, vae.quant_conv):
            part.requires_grad_(False).eval()
    rng = np.random.default_rng(cfg.seed + 2)
    n_train = len(images) - min(1000, len(images) // 8)
    probs = vae_sample_weights(scenes[:n_train], cfg.vae_hard_weight)

    def loss_fn(step):
        picks = (rng.integers(0, n_train, cfg.vae_batch) if cfg.vae_hard_weight == 1
                 else rng.choice(n_train, cfg.vae_batch, p=probs))  # uniform: the first build's draws
        x = to_model_input(images[picks], device)
        with torch.set_grad_enabled(not cfg.vae_decoder_only):
            posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        err = recon.float() - x
        weight = edge_weight(x)
        rec = (weight * (err.pow(2) + 0.1 * err.abs())).mean()
        return rec + cfg.vae_kl_weight * posterior.kl().mean()

    trainer = Trainer("vae", vae, cfg.vae_steps, cfg.vae_lr, work, device, cfg.checkpoint_every)
    trainer.run(loss_fn)
    vae.eval()
    if cfg.vae_decoder_only:  # the latents are unchanged: so is their scale
        vae.save_pretrained(target)
        log(f"VAE (new decoder, encoder and scaling_factor {vae.config.scaling_factor} kept) saved to {target}")
        return vae
    # SD's scaling factor: 1 / std of the (sampled) latents over the training images
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        batches = [images[i : i + 256] for i in range(0, min(n_train, 4096), 256)]
        latents = torch.cat([
            vae.encode(to_model_input(b, device)).latent_dist.sample(gen) for b in batches
        ])
    scaling = 1.0 / latents.float().std().item()
    vae.register_to_config(scaling_factor=round(scaling, 5))
    vae.save_pretrained(target)
    log(f"VAE saved to {target}; latent std {1 / scaling:.4f} -> scaling_factor {scaling:.5f}")
    return vae


def unet_model(cfg: Config):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4,
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=cfg.unet_layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=8, norm_num_groups=32,
    )


def load_deeper_unet(unet, earlier) -> list[str]:
    """Load `earlier`'s weights into `unet`, a UNet2DConditionModel with more layers per block
    (`layers_per_block`; a layer is a ResNet block, with its cross-attention in a CrossAttn block) and
    otherwise the same shape, so that `unet` computes what `earlier` did (up to float rounding) until it
    trains; its added layers are the capacity that training then fills. Returns the new layers' names.

    Down blocks: the new layers come after the old ones at each level, as identities (each ResNet's
    second convolution and each attention's `proj_out` zeroed: they add 0 to their input), so each of
    them hands the up path a skip equal to the old last layer's. Up blocks: layer k takes the skip
    of down layer (n - 1 - k) (diffusers pops the skips in reverse), so the old first layer stays
    first, the new ones come right after it, and the old later layers move down by as many, each
    still meeting the skip it was trained on. A new up layer's input is [hidden, skip]: its 1x1
    shortcut starts as [I | 0] (pass the hidden states, ignore the skip) and its second convolution
    at zero."""
    old_n = earlier.config.layers_per_block
    add = unet.config.layers_per_block - old_n
    if add < 1:
        raise ValueError(f"load_deeper_unet needs more layers per block than the earlier UNet's {old_n}")

    def renamed(key: str) -> str:
        parts = key.split(".")
        if parts[0] == "up_blocks" and parts[2] in ("resnets", "attentions") and int(parts[3]) >= 1:
            parts[3] = str(int(parts[3]) + add)  # old up layer i >= 1 -> i + add
        return ".".join(parts)

    theirs = {renamed(k): v for k, v in earlier.state_dict().items()}
    missing = load_into_deeper(unet, theirs, "UNet", "--unet-channels")
    new = sorted({".".join(k.split(".")[:4]) for k in missing})
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name in new:
            layer = modules[name]
            if name.split(".")[2] == "attentions":
                layer.proj_out.weight.zero_()
                layer.proj_out.bias.zero_()
                continue
            layer.conv2.weight.zero_()
            layer.conv2.bias.zero_()
            if layer.conv_shortcut is not None:  # an up layer: [hidden, skip] -> hidden
                out = layer.conv_shortcut.out_channels
                if layer.conv_shortcut.in_channels < out or layer.conv_shortcut.kernel_size != (1, 1):
                    raise ValueError(f"{name}: cannot start as an identity")
                layer.conv_shortcut.weight.zero_()
                layer.conv_shortcut.weight[:, :out, 0, 0] = torch.eye(out)
                layer.conv_shortcut.bias.zero_()
    return new


def text_encoder_from_clip(clip):
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval()


def stage_unet(cfg: Config, out: Path, work: Path, tokenizer, clip, vae, scenes, images, device,
               init: Path | None = None):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    target = out / "mini-sd" / "unet"
    if (target / "diffusion_pytorch_model.safetensors").exists():
        return UNet2DConditionModel.from_pretrained(target)
    init_layers = None if init is None else UNet2DConditionModel.load_config(init)["layers_per_block"]
    if init_layers is not None and init_layers > cfg.unet_layers:  # before minutes of encoding
        raise ValueError(f"--unet-init {init} has {init_layers} layers per block: "
                         f"pass --unet-layers {init_layers} (or more) to continue it")
    text_encoder = text_encoder_from_clip(clip).to(device).requires_grad_(False)
    vae = vae.to(device).requires_grad_(False)
    n_train = len(images) - min(1000, len(images) // 8)
    # encode the training images once: the latent distribution's mean and std
    moments = []
    with torch.no_grad():
        for i in tqdm(range(0, n_train, 512), desc="encode", mininterval=5):
            dist = vae.encode(to_model_input(images[i : min(i + 512, n_train)], device)).latent_dist
            moments.append(torch.stack([dist.mean, dist.std], 1).half())
    moments = torch.cat(moments)  # (N, 2, 4, h, w)
    scaling = vae.config.scaling_factor

    torch.manual_seed(cfg.seed)
    unet = unet_model(cfg)
    if init is not None:  # continue training an earlier UNet (weights only: a fresh optimizer)
        earlier = UNet2DConditionModel.from_pretrained(init).float()
        if init_layers < cfg.unet_layers:  # a deeper UNet, the same function
            new = load_deeper_unet(unet, earlier)
            log(f"unet: {len(new)} layers added as identities ({', '.join(new[:2])}, ...)")
        else:
            unet.load_state_dict(earlier.state_dict())
        log(f"unet: starting from the weights in {init}")
    unet = unet.to(device).train()
    ema = [p.detach().clone() for p in unet.parameters()]
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=cfg.prediction_type)
    rng = random.Random(cfg.seed + 3)
    gen = torch.Generator(device).manual_seed(cfg.seed + 3)

    cum_weights = np.cumsum(unet_sample_weights(scenes[:n_train], cfg.unet_small_weight)).tolist()

    def loss_fn(step):
        if cfg.unet_small_weight == 1:  # uniform: the earlier phases' draws, unchanged
            idx = [rng.randrange(n_train) for _ in range(cfg.unet_batch)]
        else:
            idx = rng.choices(range(n_train), cum_weights=cum_weights, k=cfg.unet_batch)
        captions = [
            "" if rng.random() < cfg.caption_dropout
            else random_caption(scenes[i], rng, cfg.mention_prob)
            for i in idx
        ]
        with torch.no_grad():
            tokens = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids.to(device)
            prompt_embeds = text_encoder(tokens)[0]
            m = moments[idx].float()
            latents = (m[:, 0] + m[:, 1] * torch.randn(m[:, 0].shape, generator=gen, device=device))
            latents = latents * scaling
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, 1000, (len(idx),), generator=gen, device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target_ = noise if cfg.prediction_type == "epsilon" else noise_scheduler.get_velocity(
            latents, noise, t)
        pred = unet(noisy, t, prompt_embeds).sample
        weights = None if cfg.unet_object_weight == 1 else object_weight_map(
            [scenes[i] for i in idx], cfg.unet_object_weight, latents.shape[-1]).to(device)
        return weighted_mse(pred.float(), target_, weights)

    def ema_update(step):
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1 - decay)

    trainer = Trainer("unet", unet, cfg.unet_steps, cfg.unet_lr, work, device, cfg.checkpoint_every)
    if "ema" in trainer.extra:
        ema = [e.to(device) for e in trainer.extra["ema"]]
    trainer.extra["ema"] = ema
    trainer.run(loss_fn, after_step=ema_update)
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    unet.eval().save_pretrained(target)
    log(f"UNet (EMA weights) saved to {target}")
    return unet


def stage_assemble(cfg: Config, out: Path, tokenizer, clip, vae, unet):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    target = out / "mini-sd"
    # SD 1.5's scheduler config, key for key: PNDM ignores clip_sample, but the schedulers built from
    # it with from_config read it (DDIM's own default, True, would clip the latents to [-1, 1])
    scheduler = PNDMScheduler.from_config(dict(
        **SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
        clip_sample=False, prediction_type=cfg.prediction_type,
    ))
    pipe = StableDiffusionPipeline(
        vae=vae.cpu().float(), text_encoder=text_encoder_from_clip(clip.cpu().float()),
        tokenizer=as_loaded(tokenizer), unet=unet.cpu().float(), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(target, safe_serialization=True)
    # fp16 on disk, configs left in float32 so that a plain from_pretrained loads float32 on a CPU
    for weights in list(target.rglob("*.safetensors")) + list((out / "mini-clip").rglob("*.safetensors")):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    (target / "build_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log(f"pipeline saved to {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models", help="models folder")
    parser.add_argument("--work", type=Path, default=ROOT / "build", help="checkpoints and caches")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests (< 2 min on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier outputs and checkpoints")
    parser.add_argument("--unet-init", type=Path, default=None,
                        help="a UNet folder to continue training from (weights only)")
    parser.add_argument("--clip-init", type=Path, default=None,
                        help="a mini-clip folder to continue training from (weights only)")
    parser.add_argument("--vae-init", type=Path, default=None,
                        help="a VAE folder to continue training from (weights only)")
    parser.add_argument("--until", choices=("clip", "vae", "unet"), default=None,
                        help="stop after this stage (its output is saved; nothing is assembled)")
    for field, value in asdict(Config()).items():
        if isinstance(value, (int, float, str)):
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args()

    cfg = Config(**(SMOKE if args.smoke else {}))
    for field in asdict(cfg):
        value = getattr(args, field, None)
        if value is not None:
            setattr(cfg, field, value)
    if cfg.clip_lock_text and args.clip_init is None:  # before the data is rendered, not after
        parser.error("--clip-lock-text 1 keeps the text tower of an earlier CLIP: give --clip-init FOLDER")
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
        for name in ("mini-sd", "mini-clip"):
            shutil.rmtree(args.out / name, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log(f"building into {args.out} on {device} with {json.dumps(asdict(cfg))}")
    t0 = time.time()

    tokenizer = stage_tokenizer(args.out)
    scenes, images = stage_data(cfg, args.work)
    clip = stage_clip(cfg, args.out, args.work, tokenizer, scenes, images, device, init=args.clip_init)
    log(f"clip done at {time.time() - t0:.0f} s")
    if args.until == "clip":
        return
    vae = stage_vae(cfg, args.out, args.work, scenes, images, device, init=args.vae_init)
    log(f"vae done at {time.time() - t0:.0f} s")
    if args.until == "vae":
        return
    unet = stage_unet(cfg, args.out, args.work, tokenizer, clip, vae, scenes, images, device,
                      init=args.unet_init)
    log(f"unet done at {time.time() - t0:.0f} s")
    if args.until == "unet":
        return
    stage_assemble(cfg, args.out, tokenizer, clip, vae, unet)
    log(f"built in {time.time() - t0:.0f} s; evaluate with: python scripts/evaluate.py")


if __name__ == "__main__":
    main()
