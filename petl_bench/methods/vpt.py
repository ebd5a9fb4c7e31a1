"""Visual prompt tuning in the image tower only (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv 2203.12119),
at the points of VoP's ablations (Huang et al., CVPR 2023, arXiv 2211.12764): ``vpt_shallow`` — prompts at the first
layer only (VoP's prompt-depth-1 point), ``vpt_deep`` — prompts at every layer (VoP's "visual prompts only" row,
36.5 T2V R@1 on MSR-VTT vs 39.6 with text prompts too). The text tower is plain frozen CLIP.

The paper states (VPT): learnable tokens are inserted after CLS, [CLS, P, patches]; VPT-shallow inserts them once
before the first layer and lets them flow through; VPT-deep inserts a new set at every layer, replacing what the
previous layer made of the last set. VPT initialises prompts with a uniform xavier-style draw.

The suite chose VoP's conventions for the prompts themselves, so that these rows are VoP's ablation points: 8 prompts
per layer, N(0, 0.02²) init, inserted after the positional embedding (none added to them) and before ``ln_pre``, the
same prompts for every frame, no weight decay on them (token embeddings); the feature is read at CLS as usual. Sizes:
shallow 8·768 = 6,144, deep 12·8·768 = 73,728 on ViT-B/32 and B/16. Prompts are not an identity: they change the CLS
output from the first step (VoP's choice, as in VPT). Order-blind (per-frame prompts). Head: meanP.
"""

from __future__ import annotations

import torch
from torch import nn

from petl_bench.backbone import ForwardContext
from petl_bench.module import RetrievalModule


class VisualPromptTuning(RetrievalModule):
    """Frozen CLIP + learnable visual prompts after CLS.

    Args:
        prompt_length: prompts per layer (VoP's 8).
        deep: a new prompt set at every visual layer (VPT-deep) or only at the first (VPT-shallow).
        prompt_init_std: std of the normal init (VoP's 0.02).
    """

    def __init__(self, prompt_length: int = 8, deep: bool = False, prompt_init_std: float = 0.02,
                 similarity: str = "meanP", lr: float = 1e-4, **kwargs):
        super().__init__(similarity=similarity, lr=lr, **kwargs)
        if prompt_length < 1:
            raise ValueError(f"prompt_length must be positive, got {prompt_length}")
        self.prompt_length = prompt_length
        self.deep = deep
        layers = len(self.clip.visual_blocks) if deep else 1
        self.visual_prompts = nn.Parameter(torch.randn(layers, prompt_length, self.clip.visual_width)
                                           * prompt_init_std)

    def _prompts(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.visual_prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)

    def visual_tokens(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return torch.cat([x[:, :1], self._prompts(0, x), x[:, 1:]], dim=1)

    def visual_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.deep and i > 0:
            x = torch.cat([x[:, :1], self._prompts(i, x), x[:, 1 + self.prompt_length:]], dim=1)
        return super().visual_block(i, block, x, ctx)

    def is_trainable(self, name: str) -> bool:
        return name == "visual_prompts"

    def param_weight_decay(self, name: str, param: nn.Parameter) -> float:
        return 0.0 if name == "visual_prompts" else super().param_weight_decay(name, param)
