"""utils.attention: the recorder changes nothing, records what it says, and cleans up after itself."""

import pytest
import torch

from utils.attention import AttentionRecorder, record_cross_attention

TOKENS = 7  # text length of the tiny test prompt embeddings


@pytest.fixture(scope="module")
def tiny_unet():
    """A small random SD-style UNet: cross-attention at two levels, latents 4 x 8 x 8."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return unet.eval()


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    prompt_embeds = torch.randn(batch, TOKENS, 16, generator=g)
    return latents, torch.tensor(500), prompt_embeds


@torch.no_grad()
def test_recorder_leaves_output_unchanged(tiny_unet):
    latents, t, prompt_embeds = _inputs()
    reference = tiny_unet(latents, t, encoder_hidden_states=prompt_embeds).sample
    with record_cross_attention(tiny_unet, layers="attn"):  # every attention layer recorded
        recorded = tiny_unet(latents, t, encoder_hidden_states=prompt_embeds).sample
    assert torch.allclose(recorded, reference, atol=1e-5)


@torch.no_grad()
def test_bundled_unet_output_unchanged():
    from diffusers import UNet2DConditionModel

    from tests.conftest import MINI_SD

    unet = UNet2DConditionModel.from_pretrained(MINI_SD / "unet").eval()
    g = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    prompt_embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    reference = unet(latents, 999, encoder_hidden_states=prompt_embeds).sample
    with record_cross_attention(unet) as store:
        recorded = unet(latents, 999, encoder_hidden_states=prompt_embeds).sample
    assert torch.allclose(recorded, reference, atol=1e-5)
    assert len(store.maps) == sum(name.endswith("attn2") for name, _ in unet.named_modules())


@torch.no_grad()
def test_maps_shapes_and_sum_to_one(tiny_unet):
    latents, t, prompt_embeds = _inputs(batch=3)
    with record_cross_attention(tiny_unet) as store:
        tiny_unet(latents, t, encoder_hidden_states=prompt_embeds)
    attn2 = {name: m for name, m in tiny_unet.named_modules() if name.endswith("attn2")}
    assert set(store.maps) == set(attn2)
    sides = {"down_blocks.0": 8, "down_blocks.1": 4, "mid_block": 4, "up_blocks.0": 4, "up_blocks.1": 8}
    for name, probs in store.maps.items():
        side = next(s for prefix, s in sides.items() if name.startswith(prefix))
        assert probs.shape == (3, attn2[name].heads, side * side, TOKENS), name
        assert probs.dtype == torch.float32
        assert (probs >= 0).all()
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


@torch.no_grad()
def test_self_attention_maps_are_square(tiny_unet):
    latents, t, prompt_embeds = _inputs(batch=1)
    with record_cross_attention(tiny_unet, layers="attn1") as store:
        tiny_unet(latents, t, encoder_hidden_states=prompt_embeds)
    assert store.maps and all(name.endswith("attn1") for name in store.maps)
    for probs in store.maps.values():
        assert probs.shape[-1] == probs.shape[-2]


@torch.no_grad()
def test_mean_over_calls(tiny_unet):
    (latents, t, prompt_embeds), (latents2, _, _) = _inputs(), _inputs(seed=1)
    maps = []
    for x in (latents, latents2):
        with record_cross_attention(tiny_unet) as store:
            tiny_unet(x, t, encoder_hidden_states=prompt_embeds)
        maps.append(store.maps)
    with record_cross_attention(tiny_unet) as store:
        for x in (latents, latents2):
            tiny_unet(x, t, encoder_hidden_states=prompt_embeds)
    for name, mean in store.maps.items():
        assert store.counts[name] == 2
        assert torch.allclose(mean, (maps[0][name] + maps[1][name]) / 2, atol=1e-6)
    store.reset()
    assert store.maps == {}


def test_processors_restored_even_after_an_error(tiny_unet):
    before = dict(tiny_unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with record_cross_attention(tiny_unet):
            recorders = [p for p in tiny_unet.attn_processors.values() if isinstance(p, AttentionRecorder)]
            assert len(recorders) == len(before) // 2  # attn2 only, attn1 untouched
            raise RuntimeError("boom")
    after = tiny_unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_unknown_layer_name_raises(tiny_unet):
    with pytest.raises(ValueError, match="no attention layer"):
        with record_cross_attention(tiny_unet, layers="attn3"):
            pass
