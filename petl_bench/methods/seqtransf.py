"""Frozen CLIP + CLIP4Clip's temporal transformer ("seqTransf"; Luo et al., "CLIP4Clip: An Empirical Study of CLIP for
End to End Video Clip Retrieval", Neurocomputing 2022, arXiv 2104.08860; official code ArrowLuo/CLIP4Clip @ 508ffa3,
modules/modeling.py and modules/module_cross.py). The classic "frozen CLIP + temporal module" point: MV-Adapter's
table lists it at 8.45% of ViT-B/16 with CLIP frozen. CLIP4Clip itself fine-tunes CLIP too; here only the temporal
module trains.

The release does (``--sim_header seqTransf``), and this module follows:
- module: ``frame_position_embeddings = nn.Embedding(77, 512)`` (CLIP's context length × the cross config's hidden
  size) and ``transformerClip``: CLIP's residual attention blocks (LN → MHA → residual, LN → MLP with QuickGELU →
  residual), ``--cross_num_hidden_layers`` 4 layers, width = CLIP's text width, heads = width // 64 — i.e. exactly
  the first 4 blocks of CLIP's text tower;
- init: ``apply(init_weights)`` (normal std 0.02, zero biases, unit LayerNorms), then, when the checkpoint has no
  such keys (training from CLIP), ``frame_position_embeddings.weight`` ← CLIP's text ``positional_embedding`` and
  ``transformerClip.resblocks.{0..3}`` ← CLIP's text ``transformer.resblocks.{0..3}``: the module *starts as a copy of
  the text tower's first 4 blocks*. It is not an identity at step 0 (the output is added to the input);
- forward on the frame embeddings (B, T, D) after CLIP's visual projection, un-normalised: add the embedding of
  position t = 0..T−1 to frame t; a key mask (1 − mask)·(−1e6) of shape (B, T, T), repeated per head, so no frame
  attends to padded frames (padded frames still produce outputs, which the pooling ignores); 4 blocks without a
  causal mask; then the residual to the *input* (un-normalised frames, without the position embeddings):
  out = Transformer(x + pos) + x;
- pooling: each output frame L2-normalised, masked mean, L2-normalised, cosine with the text — the meanP head.

The suite chose: CLIP's two towers frozen (MV-Adapter's "frozen CLIP + seqTransf" point; CLIP4Clip's own default
trains everything); the copies are made from the backbone this module was built with (with ``pretrained: null`` they
copy random weights); ``init: random`` keeps the ``init_weights`` draw instead of the copy. The heads follow the text
blocks copied (width // 64 for OpenAI's CLIP, as the release computes; the tiny backbone's own head count). The
frame embedding must be as wide as the text tower (512 = 512 for ViT-B; the release assumes it). Trainable on
ViT-B/32 and B/16: 4·3,152,384 + 77·512 = 12,648,960 (8.45% of ViT-B/16's 149,620,737). Order-aware (frame
positions). Head: meanP over the transformed frames.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from petl_bench.backbone import attention_part, mlp_part
from petl_bench.module import RetrievalModule

INITS = ("clip", "random")
MASK_VALUE = -1000000.0  # the release's additive key mask


class SeqTransf(RetrievalModule):
    """Frozen CLIP + a trainable temporal transformer over the frame embeddings, residual to mean pooling.

    Args:
        layers: temporal transformer depth (the release's ``--cross_num_hidden_layers`` 4).
        init: ``clip`` (copy CLIP's text positional embedding and first ``layers`` text blocks, the release) or
            ``random`` (normal std 0.02, zero biases, unit LayerNorms).
    """

    def __init__(self, layers: int = 4, init: str = "clip", similarity: str = "meanP", lr: float = 1e-4, **kwargs):
        super().__init__(similarity=similarity, lr=lr, **kwargs)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not 1 <= layers <= len(self.clip.text_blocks):
            raise ValueError(f"layers must lie in [1, {len(self.clip.text_blocks)}] (copied from the text tower), "
                             f"got {layers}")
        if self.clip.embed_dim != self.clip.text_width:
            raise ValueError(f"{self.clip.model_name}: CLIP4Clip's temporal transformer is as wide as the text tower "
                             f"({self.clip.text_width}) but frame embeddings have {self.clip.embed_dim} channels")
        model = self.clip.model
        self.frame_position_embeddings = nn.Embedding(model.positional_embedding.shape[0], self.clip.text_width)
        self.temporal_blocks = nn.ModuleList(copy.deepcopy(self.clip.text_blocks[i]) for i in range(layers))
        with torch.no_grad():
            if init == "clip":
                self.frame_position_embeddings.weight.copy_(model.positional_embedding)
            else:
                self.frame_position_embeddings.apply(_init_weights)
                self.temporal_blocks.apply(_init_weights)
        for p in self.temporal_blocks.parameters():
            p.requires_grad_(True)

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        frames = super().encode_video(video, video_mask)  # (B, T, D), un-normalised
        B, T, _ = frames.shape
        if video_mask is None:
            video_mask = torch.ones(B, T, dtype=torch.bool, device=frames.device)
        if T > self.frame_position_embeddings.num_embeddings:
            raise ValueError(f"{T} frames exceed the {self.frame_position_embeddings.num_embeddings} frame positions")
        x = frames + self.frame_position_embeddings.weight[:T].to(frames.dtype)
        keys = (1.0 - video_mask.to(frames.dtype)).unsqueeze(1) * MASK_VALUE  # (B, 1, T)
        for block in self.temporal_blocks:
            mask = keys.expand(B, T, T).repeat_interleave(block.attn.num_heads, dim=0)  # (B·heads, T, T)
            x = x + attention_part(block, x, mask)
            x = x + mlp_part(block, x)
        return x + frames

    def is_trainable(self, name: str) -> bool:
        return name.startswith(("frame_position_embeddings.", "temporal_blocks."))


def _init_weights(module: nn.Module) -> None:
    """The release's ``init_weights``: Linear/Embedding weights N(0, 0.02²), Linear biases 0, LayerNorm 1/0; the
    attention's in_proj is not a Linear, so it keeps torch's own init (xavier-uniform, zero bias)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.zero_()
    if isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
    if isinstance(module, nn.MultiheadAttention):  # a bare parameter the release leaves at torch's init
        nn.init.xavier_uniform_(module.in_proj_weight)
        module.in_proj_bias.zero_()
