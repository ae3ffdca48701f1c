"""A fake "real" checkpoint: a tiny RANDOM Stable Diffusion 1.5, in a Hugging Face hub cache.

`build_fake_real_cache(cache_dir)` writes a pipeline with SD 1.5's structure (the classes, the
4-level UNet with cross-attention in the first three, 8 attention heads,
epsilon prediction, PNDM with SD's schedule, an 8x VAE, a quick_gelu CLIP text encoder with the
real CLIP tokenizer, 77 tokens) but tiny channel counts and a size of its own: 16x16 latents,
128x128 images, hidden size 32, and one layer per UNet block where SD has two (this halves the
cost of a UNet call, which is what the notebook runs spend their time on). Those sizes differ from
the bundled mini model (8x8 latents, 64x64 images, hidden size 64) and from real SD (64x64,
512x512, 768), so a notebook that hard-codes a size instead of reading it from the loaded model's
config fails on it. (One layer per block is the mini model's too: a hard-coded layers_per_block
would not be caught here.)

It is laid out as `huggingface_hub` lays out HF_HUB_CACHE after a download of
stable-diffusion-v1-5/stable-diffusion-v1-5:

    <cache_dir>/models--stable-diffusion-v1-5--stable-diffusion-v1-5/
        refs/main                      # the commit hash of the snapshot
        blobs/<sha256 or git sha1>     # file contents, named by hash (sha256: LFS files)
        snapshots/<commit>/...         # the repository's files, relative symlinks into blobs/

so with HF_HUB_CACHE=<cache_dir> and HF_HUB_OFFLINE=1, `utils.models.load_pipeline(...,
model="real")` loads it exactly as it would load the real, cached checkpoint.

The same cache also holds fakes of the other two real checkpoints in the registry, made the same
way (tiny, random, sizes of their own):

- INPAINT_REPO_ID (SD 1.5 inpainting): the SD 1.5 fake with a 9-channel UNet (4 latents + 1 mask +
  4 masked-image latents) and a DDIM scheduler, as the hub's model_index.json lists;
- DEPTH_REPO_ID (SD 2 depth): a 5-channel UNet (latents + depth) with SD 2's linear projections in
  its attention, a gelu text encoder of another hidden size, PNDM with epsilon prediction, and a
  tiny non-hybrid DPTForDepthEstimation with a DPTImageProcessor at DEPTH_INPUT_SIDE (neither the
  image size nor the latent size, as real SD 2 depth's 384-px MiDaS input is neither).

Also runnable: `python tests/fake_real_checkpoint.py DIR` writes the cache into DIR and prints
the environment variables that make the notebooks use it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
INPAINT_REPO_ID = "stable-diffusion-v1-5/stable-diffusion-inpainting"
DEPTH_REPO_ID = "sd2-community/stable-diffusion-2-depth"
TOKENIZER_SOURCE = ROOT / "models" / "mini-sd" / "tokenizer"

# the fake's sizes, for the tests to compare against what a loader returns
LATENT_SIDE = 16
VAE_SCALE_FACTOR = 8
IMAGE_SIDE = LATENT_SIDE * VAE_SCALE_FACTOR  # 128
HIDDEN_SIZE = 32
UNET_CHANNELS = (8, 16, 16, 16)  # tiny: the test checks code paths, not pictures
UNET_LAYERS_PER_BLOCK = 1  # SD's 2 costs twice the time a call (76 vs 35 ms on one CPU thread)
VAE_CHANNELS = (8, 16, 32, 32)
DEPTH_HIDDEN_SIZE = 48  # SD 2's OpenCLIP text encoder is wider than SD 1.5's (1024 vs 768)
DEPTH_INPUT_SIDE = 96  # the fake DPT's input and output side
SEED = 0

# Stable Diffusion 1.5's scheduler/scheduler_config.json, key for key (PNDM ignores clip_sample, but
# DDIM built from this config reads it), with its default prediction type, epsilon, written out
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
    clip_sample=False, prediction_type="epsilon",
)


def repo_folder(cache_dir: str | os.PathLike, repo_id: str = REPO_ID) -> Path:
    """The folder the hub cache uses for a model repository: models--{org}--{name}."""
    return Path(cache_dir) / "--".join(["models", *repo_id.split("/")])


def _text_encoder(hidden_size: int, hidden_act: str):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        projection_dim=hidden_size, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=hidden_act, layer_norm_eps=1e-5,
        # SD 1.5's text_encoder/config.json keeps the legacy ids (pooled output at argmax(ids))
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))


def _unet(in_channels: int, cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIDE, in_channels=in_channels, out_channels=4, layers_per_block=UNET_LAYERS_PER_BLOCK,
        block_out_channels=UNET_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim, norm_num_groups=8, **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIDE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CHANNELS, layers_per_block=2, norm_num_groups=8,
        scaling_factor=0.18215,
    )


def build_fake_pipeline(repo_id: str = REPO_ID):
    """The tiny random pipeline standing in for `repo_id` (float32, seeded: the same weights
    every time): StableDiffusionPipeline, StableDiffusionInpaintPipeline or
    StableDiffusionDepth2ImgPipeline."""
    import torch
    from diffusers import (
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )
    from transformers import CLIPTokenizer, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    if repo_id not in (REPO_ID, INPAINT_REPO_ID, DEPTH_REPO_ID):
        raise ValueError(f"no fake for {repo_id!r}")
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_SOURCE)
    depth = repo_id == DEPTH_REPO_ID
    torch.manual_seed(SEED)
    text_encoder = _text_encoder(DEPTH_HIDDEN_SIZE, "gelu") if depth else _text_encoder(HIDDEN_SIZE, "quick_gelu")
    torch.manual_seed(SEED + 1)
    if depth:  # SD 2: linear projections in the transformer blocks, heads per level
        unet = _unet(5, DEPTH_HIDDEN_SIZE, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True)
    else:
        unet = _unet(9 if repo_id == INPAINT_REPO_ID else 4, HIDDEN_SIZE, attention_head_dim=8)
    torch.manual_seed(SEED + 2)
    vae = _vae()
    parts = dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval())
    if repo_id == REPO_ID:
        scheduler = PNDMScheduler.from_config(SD15_SCHEDULER)  # keeps clip_sample in the config
        return StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if repo_id == INPAINT_REPO_ID:
        scheduler = DDIMScheduler.from_config(SD15_SCHEDULER)
        return StableDiffusionInpaintPipeline(**parts, scheduler=scheduler, safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
    torch.manual_seed(SEED + 3)
    estimator = DPTForDepthEstimation(DPTConfig(
        image_size=DEPTH_INPUT_SIDE, patch_size=16, hidden_size=32, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=64, is_hybrid=False,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 64, 64],
        reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=32,
    ))
    processor = DPTImageProcessor(size={"height": DEPTH_INPUT_SIDE, "width": DEPTH_INPUT_SIDE},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return StableDiffusionDepth2ImgPipeline(**parts, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
                                            depth_estimator=estimator.eval(), feature_extractor=processor)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _place_in_cache(files: Path, cache_dir: Path, repo_id: str) -> Path:
    """Move a saved pipeline folder into the hub cache layout; return the snapshot folder."""
    paths = sorted(p for p in files.rglob("*") if p.is_file())
    digests = {}
    for path in paths:
        data = path.read_bytes()
        # the hub names LFS files (weights) by sha256 and the others by their git blob sha1
        digests[path] = (hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors"
                         else _git_blob_sha1(data))
    tree = "".join(f"{p.relative_to(files).as_posix()} {digests[p]}\n" for p in paths)
    commit = hashlib.sha1(tree.encode()).hexdigest()  # deterministic, 40 hex digits like a commit

    storage = repo_folder(cache_dir, repo_id)
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for path in paths:
        blob = storage / "blobs" / digests[path]
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlinks (some Windows setups): the hub then stores copies too
            shutil.copyfile(blob, link)
    (storage / "refs" / "main").write_text(commit)  # no trailing newline, as the hub writes it
    return snapshot


def build_fake_real_cache(cache_dir: str | os.PathLike, repo_ids=(REPO_ID, INPAINT_REPO_ID, DEPTH_REPO_ID)) -> Path:
    """Write the fakes of `repo_ids` into the hub cache `cache_dir` (created if needed).

    Returns the snapshot folder of the first (`<cache_dir>/models--.../snapshots/<commit>`).
    Weights are safetensors; everything is seeded, so two builds are byte-identical (same commit).
    """
    if isinstance(repo_ids, str):
        repo_ids = (repo_ids,)
    snapshots = [_build_one(Path(cache_dir), repo_id) for repo_id in repo_ids]
    return snapshots[0]


def _build_one(cache_dir: Path, repo_id: str) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_fake_pipeline(repo_id)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        saved = Path(tmp) / "repo"
        pipe.save_pretrained(saved, safe_serialization=True)
        # the tokenizer files exactly as the course ships them (the real CLIP tokenizer)
        shutil.rmtree(saved / "tokenizer")
        shutil.copytree(TOKENIZER_SOURCE, saved / "tokenizer")
        return _place_in_cache(saved, cache_dir, repo_id)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="fake-hf-cache-"))
    snapshot = build_fake_real_cache(target)
    print(f"wrote {snapshot}")
    print(f"use it: COURSE_MODEL=real HF_HUB_OFFLINE=1 HF_HUB_CACHE={target.resolve()} jupyter lab")
