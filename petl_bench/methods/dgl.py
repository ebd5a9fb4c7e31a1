"""DGL: Dynamic Global-Local Prompt Tuning for Text-Video Retrieval (Yang, Zhu, Wang, Yang; AAAI 2024,
arXiv 2401.10588; release github.com/knightyxp/DGL, commit 9139fd11b320c9d45f59d318452e12ca167660de).

CLIP stays frozen. Deep prompts enter every layer of both towers, and the prompts of both towers are *generated from one
latent space*, so text and frame prompts are tied:

- ``latent_space: linear`` (DGL-Linear, configs/model/dgl_linear.yaml): per layer, ``n_local`` = 4 latent vectors of
  the image width are the frame prompts of that layer (the same for every frame); two linear maps turn them into the
  layer's 4 text "prefix" and 4 text "suffix" prompts.
- ``latent_space: transformer`` (DGL-Transformer, configs/model/dgl_transformer.yaml): per layer, 8 text tokens and
  4 tokens per frame position (4·T) of the image width go through one shared transformer block (attention across the
  layer's tokens only); its text tokens pass an MLP (W → 2W → text width, QuickGELU) to become the text prompts, its
  frame tokens are the frame prompts, so each frame position has its own prompts.

**Global-local video attention.** 4 global prompts (one trainable set, inserted once after ``ln_pre`` and carried
through the layers) sit beside the frames. In every image layer, a frame's tokens [CLS, 4 local prompts, patches] attend
to themselves plus their video's global prompts (local attention), and the global prompts attend to themselves plus
every token of every frame of their video (global attention); both use the frozen block's own attention weights, and
the MLP runs per token. The video embedding is the first global prompt after ``ln_post`` and the projection
(``visual_output_type: global_prompt0``, the release's default); the text embedding is CLIP's EOT feature. Score:
cosine × CLIP's frozen logit scale; loss: symmetric InfoNCE (the release's CrossEn both ways).

Text prompts (the release's placement): after the positional embedding is added to the caption's ``max_words`` tokens,
the prefix prompts go right after SOT and the suffix prompts after the last of the ``max_words`` positions, i.e.
``[SOT, 4 prefix, words, EOT, pad…, 4 suffix]``; they carry no positional embedding; at every later layer both sets
are overwritten with that layer's prompts. Under CLIP's causal mask the suffix prompts come after EOT, so **they cannot
reach the feature: they are dead in the release** (DGL-Linear's suffix projection gets an exactly zero gradient,
tests/fixtures/parity/dgl_linear.json). The suite keeps the placement, as released.

Trainable parameters (``petl-bench params``; the release counts ``requires_grad`` tensors of its whole model, ViT-B/32,
12 frames, 12 prompt layers; the papers print 0.83M / 9.57M):

=================  ==========================================================================  ===========
head               tensors                                                                      ViT-B/32, T=12
=================  ==========================================================================  ===========
linear             latent 12·4·768 + 2 × (768·512 + 512) + global 4·768                        827,392
transformer        latent 12·(8 + 4·12)·768 + prompt block 7,087,872 + MLP 1,968,128 + global  9,575,168
=================  ==========================================================================  ===========

Both equal the release's own count (tests/test_dgl_stop.py) and give the papers' 0.83M / 9.57M (0.827M rounded, 9.575M cut). On ViT-B/16 the
widths are the same, so are the counts. The transformer head grows with the frame count (4·768·12 per frame).

The paper and the release differ in ways the suite resolves in the release's favour: the video read-out is the first
global prompt only; the suffix text prompts sit after the padding (dead); the global prompts are shallow (inserted
once), the local ones deep.

Differences from the release (what the suite does and its expected effect):

====================  ===========================================  ==============================================
topic                 release (scripts/msrvtt.sh, main.py)          suite
====================  ===========================================  ==============================================
precision             CLIP and the prompt modules' Linear layers   fp32 weights; the Trainer's precision (AMP
                      cast to fp16, AMP + GradScaler               bf16 on GPU). Parity is checked in fp64.
optimiser             AdamW β (0.9, 0.98), ε 1e-6, lr 2e-3, wd     same; weight decay on every trainable tensor but
                      0.2 on every trainable tensor whose name     biases (as released, LayerNorm gains and prompt
                      lacks "bias" (LayerNorm gains included)      embeddings are decayed too)
schedule              10% linear warm-up from 1e-8, cosine over    ``cosine_after_warmup`` (same shape, no 1e-8
                      the remaining steps, floor 1e-8              floor)
batch                 128 per GPU on 4 GPUs, features              the data config's batch; the suite's all-gather
                      all-gathered (global 512)                    gives the true gradient of the global loss
frames                12 frames, 3 fps extraction, uniform pick    the data config's frame protocol
                      (slice_framepos 2)
padded frames         no mask: a padded (zero) frame is attended   same (no mask), as released
                      by the global prompts
QB-Norm               ``search_for_best_r1_with_qb_norm.py``       not used; the suite reports plain retrieval. The
                      grid-searches QB-Norm's β on the *test*      papers' 44.7 / 45.8 are stated without it
                      similarity matrix (README "search for your
                      best R@1")
eval prompts          generated once per batch element (identical  generated once per forward (same values)
                      copies)
====================  ===========================================  ==============================================

Golden parity: tests/test_parity_dgl_stop.py runs the suite's DGL on the weights and inputs the release was run on
(tests/fixtures/parity/dgl_*.json say how) and matches its embeddings, similarity, loss and gradients within 1e-5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from petl_bench.backbone import ForwardContext, attention_part, encode_frames, mlp_part
from petl_bench.module import RetrievalModule

LATENT_SPACES = ("linear", "transformer")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PromptBlock(nn.Module):
    """DGL-Transformer's latent encoder: one pre-LN transformer block (QuickGELU MLP, ratio 4), no mask."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class DGL(RetrievalModule):
    """DGL (module docstring). Options beyond `RetrievalModule`'s:

    Args:
        latent_space: ``linear`` (DGL-Linear) or ``transformer`` (DGL-Transformer).
        local_prompt_length: frame prompts per frame and layer (4).
        global_prompt_length: global video prompts (4).
        text_prompt_length: text prompts per layer (8): the first half after SOT, the rest after the last position.
            DGL-Linear derives them from the frame prompts, so it must be 2 · local_prompt_length.
        lr / weight_decay / lr_schedule: the release's (2e-3, 0.2, warm-up then cosine); see `RetrievalModule`.
    """

    def __init__(
        self,
        latent_space: str = "transformer",
        local_prompt_length: int = 4,
        global_prompt_length: int = 4,
        text_prompt_length: int = 8,
        lr: float = 2e-3,
        weight_decay: float = 0.2,
        lr_schedule: str = "cosine_after_warmup",
        **kwargs,
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, **kwargs)
        if latent_space not in LATENT_SPACES:
            raise ValueError(f"latent_space must be one of {LATENT_SPACES}, got {latent_space!r}")
        if min(local_prompt_length, global_prompt_length, text_prompt_length) < 1:
            raise ValueError("prompt lengths must be >= 1")
        if latent_space == "linear" and text_prompt_length != 2 * local_prompt_length:
            raise ValueError("DGL-Linear maps each frame prompt to one prefix and one suffix text prompt: "
                             f"text_prompt_length must be 2 * local_prompt_length = {2 * local_prompt_length}")
        vis_w, text_w = self.clip.visual_width, self.clip.text_width
        # the release runs as many text blocks as prompt layers and indexes prompt layer i in image block i
        self.prompt_layers = len(self.clip.text_blocks)
        if len(self.clip.visual_blocks) > self.prompt_layers:
            raise ValueError(f"DGL needs an image tower no deeper than the text tower (prompt layers = text depth "
                             f"{self.prompt_layers}); {self.clip.model_name} has {len(self.clip.visual_blocks)}")
        self.latent_space = latent_space
        self.local_prompt_length = local_prompt_length
        self.text_prompt_length = text_prompt_length
        self.text_prefix_length = text_prompt_length // 2

        # the release's init for prompt vectors: uniform ±sqrt(6 / (3·patch² + width)) (VPT's xavier-style bound)
        patch = self.clip.visual.conv1.kernel_size[0]
        bound = math.sqrt(6.0 / (3 * patch * patch + vis_w))
        self.global_prompts = nn.Parameter(torch.empty(global_prompt_length, vis_w).uniform_(-bound, bound))
        if latent_space == "linear":
            self.latent_prompts = nn.Parameter(
                torch.empty(self.prompt_layers, local_prompt_length, vis_w).uniform_(-bound, bound))
            self.text_prefix_proj = nn.Linear(vis_w, text_w)
            self.text_suffix_proj = nn.Linear(vis_w, text_w)
        else:
            tokens = text_prompt_length + local_prompt_length * self.num_frames
            # an nn.Embedding in the release, left at its N(0, 1) init
            self.latent_tokens = nn.Parameter(torch.randn(self.prompt_layers, tokens, vis_w))
            self.latent_encoder = PromptBlock(vis_w, max(1, vis_w // 64))
            self.text_mlp = nn.Sequential()
            self.text_mlp.add_module("c_fc", nn.Linear(vis_w, 2 * vis_w))
            self.text_mlp.add_module("gelu", QuickGELU())
            self.text_mlp.add_module("c_proj", nn.Linear(2 * vis_w, text_w))

    # ------------------------------------------------------------------ what trains
    def is_trainable(self, name: str) -> bool:
        """Everything DGL adds; CLIP, logit_scale included, stays frozen."""
        return not name.startswith("clip.")

    def param_weight_decay(self, name: str, param: nn.Parameter) -> float:
        """As released: decay on every trainable tensor whose name lacks "bias" (prompts and LayerNorm gains too)."""
        return 0.0 if "bias" in name else self.hparams.weight_decay

    # ------------------------------------------------------------------ the shared latent space
    def generate_prompts(self, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(text prompts (layers, n_text, text width), frame prompts (layers, T, n_local, image width))."""
        n = self.local_prompt_length
        if self.latent_space == "linear":
            latent = self.latent_prompts
            text = torch.cat([self.text_prefix_proj(latent), self.text_suffix_proj(latent)], dim=1)
            frames = latent.unsqueeze(1).expand(-1, num_frames, -1, -1)
            return text, frames
        if num_frames > self.num_frames:
            raise ValueError(f"videos have {num_frames} frames but DGL-Transformer's latent tokens were built for "
                             f"num_frames={self.num_frames}; set model.num_frames to the data's num_frames")
        out = self.latent_encoder(self.latent_tokens)  # attention across one layer's tokens
        text = self.text_mlp(out[:, :self.text_prompt_length])
        frames = out[:, self.text_prompt_length:].reshape(self.prompt_layers, self.num_frames, n, -1)
        return text, frames[:, :num_frames]

    def local_prompts(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Frame prompts of every layer for this batch, (1 or B, layers, T, n, D); ``x`` enters image block 0."""
        return self.generate_prompts(ctx.num_frames)[1].unsqueeze(0)

    # ------------------------------------------------------------------ image tower
    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 frames (B, T, 3, H, W) → the video embedding (B, 1, D): global prompt 0 after ln_post and proj."""
        encode_frames(self.clip, self, video, video_mask)  # the hooks leave the global prompts in the context
        state = self._visual_state
        del self._visual_state
        visual = self.clip.visual
        pooled = visual.ln_post(state["global"][:, 0])
        return (pooled @ visual.proj if visual.proj is not None else pooled).unsqueeze(1)

    def similarity(self, text_emb: torch.Tensor, video_emb: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """Cosine between texts (C, D) and the videos' single embedding (V, 1, D); the frame mask has no say."""
        return F.normalize(text_emb, dim=-1) @ F.normalize(video_emb[:, 0], dim=-1).t()

    def visual_tokens(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        self._visual_state = ctx.state  # read back by encode_video
        return x

    def visual_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, n = ctx.batch_size, ctx.num_frames, self.local_prompt_length
        if i == 0:  # after ln_pre: [CLS, local prompts, patches] per frame; the global prompts start here
            ctx.state["local"] = self.local_prompts(x, ctx).to(x.dtype)
            ctx.state["global"] = self.global_prompts.to(x.dtype).expand(B, -1, -1)
            x = torch.cat([x[:, :1], self.layer_local(0, ctx, x), x[:, 1:]], dim=1)
        else:  # deep local prompts: this layer's replace what the previous layer made of its own
            x = torch.cat([x[:, :1], self.layer_local(i, ctx, x), x[:, 1 + n:]], dim=1)
        x, ctx.state["global"] = self.global_local_block(i, block, x, ctx.state["global"], T)
        return x

    def layer_local(self, i: int, ctx: ForwardContext, x: torch.Tensor) -> torch.Tensor:
        local = ctx.state["local"][:, i]  # (1 or B, T, n, D)
        return local.expand(ctx.batch_size, -1, -1, -1).reshape(x.shape[0], self.local_prompt_length, x.shape[-1])

    def global_local_block(self, i: int, block: nn.Module, x: torch.Tensor, g: torch.Tensor,
                           num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One frozen block: frames (B·T, S, D) attend to [their video's global prompts, themselves]; the global
        prompts (B, G, D) attend to [themselves, every token of the video]. MLP per token."""
        B, S, D = g.shape[0], x.shape[1], x.shape[2]
        xn, gn = block.ln_1(x), block.ln_1(g)
        local_kv = torch.cat([gn.repeat_interleave(num_frames, dim=0), xn], dim=1)
        global_kv = torch.cat([gn, xn.reshape(B, num_frames * S, D)], dim=1)
        x = x + block.ls_1(block.attention(q_x=xn, k_x=local_kv, v_x=local_kv))
        g = g + block.ls_1(block.attention(q_x=gn, k_x=global_kv, v_x=global_kv))
        return self.mlp_residual("visual", i, block, x), self.mlp_residual("visual", i, block, g)

    def mlp_residual(self, tower: str, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(LN2(x)); STOP adds its side branch here."""
        return x + mlp_part(block, x)

    # ------------------------------------------------------------------ text tower
    def text_tokens(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Layer 0: CLIP's positional embedding goes on the caption's tokens only, then the prompts are inserted
        (``[SOT, prefix, words…, suffix]``). The backbone adds the positional embedding of the whole sequence next, so
        it is taken off here first: the prompts carry none, as in the release."""
        if bool((ctx.eot_index < 1).any()):
            raise ValueError("a caption's token ids have no SOT/EOT (all-zero row?); tokenise with open_clip's "
                             "tokenizer, which starts every caption with SOT and ends it with EOT")
        text_prompts = self.generate_prompts(self.num_frames if self.latent_space == "transformer" else 1)[0]
        ctx.state["text_prompts"] = text_prompts.to(x.dtype)
        pos = self.clip.model.positional_embedding.to(x.dtype)
        L, P, pre = x.shape[1], self.text_prompt_length, self.text_prefix_length
        if L + P > pos.shape[0]:
            raise ValueError(f"text of {L} tokens + {P} prompts exceeds {self.clip.model_name}'s context of "
                             f"{pos.shape[0]}; lower max_words")
        x = x + pos[:L]
        prompts = ctx.state["text_prompts"][0].expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], prompts[:, :pre], x[:, 1:], prompts[:, pre:]], dim=1)
        ctx.eot_index = ctx.eot_index + pre
        return x - pos[:L + P]

    def text_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        pre, P = self.text_prefix_length, self.text_prompt_length
        if i > 0:
            prompts = ctx.state["text_prompts"][i].expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], prompts[:, :pre], x[:, 1 + pre:x.shape[1] - (P - pre)], prompts[:, pre:]], dim=1)
        x = x + attention_part(block, x, ctx.attn_mask)
        return self.mlp_residual("text", i, block, x)
