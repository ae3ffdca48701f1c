"""Record the UNet's cross-attention probabilities: which prompt tokens each image location reads.

A diffusers `Attention` module delegates its arithmetic to a *processor*. `AttentionRecorder` is a
processor that computes attention exactly as diffusers' default one does, writing the softmax out
so that it can keep the probabilities:

    Q = to_q(hidden_states)              (B, N, inner)     N = h * w image locations
    K = to_k(encoder_hidden_states)      (B, L, inner)     L = the prompt's 77 tokens
    V = to_v(encoder_hidden_states)      (B, L, inner)
    split heads -> (B, heads, N, d)      d = inner // heads
    probs = softmax(Q K^T * d**-0.5)     (B, heads, N, L)  each row sums to 1 over the L tokens
    out = to_out(probs V, heads merged)  (B, N, query_dim)

`record_cross_attention(unet)` installs one recorder on every cross-attention layer (`attn2`, the
layers that read the text) and keeps the default processor everywhere else; on exit it puts the
original processors back:

    with record_cross_attention(pipe.unet) as store:
        image = pipe(prompt).images[0]
    store.maps["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]  # (B, heads, N, L)

With classifier-free guidance the UNet's batch is [unconditional, conditional], so B is twice the
number of images and the conditional maps are the second half.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class AttentionStore:
    """Attention probabilities per layer, averaged over the calls (one call per denoising step).

    Attributes:
        sums: layer name -> float32 tensor (B, heads, N, L), the sum over calls.
        counts: layer name -> number of calls summed.
        original_processors: the UNet's processors before recording (restored on exit).
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.original_processors: dict = {}

    def add(self, name: str, probs: torch.Tensor) -> None:
        probs = probs.detach().float()
        if name in self.sums and self.sums[name].shape == probs.shape:
            self.sums[name] += probs
            self.counts[name] += 1
        else:  # first call, or a new batch shape: start again
            self.sums[name], self.counts[name] = probs.clone(), 1

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        """Layer name -> mean probabilities over the recorded calls, (B, heads, N, L)."""
        return {name: s / self.counts[name] for name, s in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


class AttentionRecorder:
    """Attention processor: the default computation, plus `store.add(name, probs)`.

    probs has shape (B, heads, N, L): B the UNet's batch, N = h * w query locations, L keys (the
    text tokens in cross-attention); it sums to 1 over L.
    """

    def __init__(self, store: AttentionStore, name: str):
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, h, w) -> (B, h*w, C)
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:  # self-attention
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        # projections: (B, N, inner), (B, L, inner), (B, L, inner)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        # split heads: (B, heads, N or L, d)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # scores and probabilities: (B, heads, N, L), softmax in float32
        scores = (query @ key.transpose(-1, -2)).float() * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch_size, out_dim=4)
            scores = scores + mask.float()
        probs = scores.softmax(dim=-1)
        self.store.add(self.name, probs)

        # weighted values, heads merged, output projection: (B, N, query_dim)
        hidden_states = (probs.to(value.dtype) @ value).transpose(1, 2)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def record_cross_attention(unet, layers: str = "attn2"):
    """Install an `AttentionRecorder` on every processor whose name contains `layers` ("attn2":
    cross-attention; "attn1": self-attention; "attn": both), yield the `AttentionStore`, and restore
    the original processors on exit (also after an error).

    Store keys are module names without ".processor", e.g.
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2".
    """
    store = AttentionStore()
    store.original_processors = dict(unet.attn_processors)
    processors = {}
    for key, processor in store.original_processors.items():
        name = key.removesuffix(".processor")
        processors[key] = AttentionRecorder(store, name) if layers in name.split(".")[-1] else processor
    if not any(isinstance(p, AttentionRecorder) for p in processors.values()):
        raise ValueError(f"no attention layer of this UNet matches {layers!r}")
    unet.set_attn_processor(processors)
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(store.original_processors))  # (it pops from the dict)
