"""Proj: tune only CLIP's two output projections — VoP's "Proj" baseline (Huang et al., CVPR 2023, arXiv 2211.12764,
Table of PETL baselines: 0.66M trainable).

The paper states: only the visual projection and the text projection train (no module is added; the model starts as
CLIP). There is no released code for this baseline.

The suite chose: ``visual.proj`` (768×512) and ``text_projection`` (512×512) of the open_clip model train, nothing
else (logit_scale frozen): 655,360 parameters on ViT-B/32 and ViT-B/16. They are matrices, so the shared recipe's
weight decay (0.2) reaches them, pulling towards 0 rather than towards CLIP's values; AdamW's decoupled decay at
lr 1e-4 shrinks them by 2e-5 per step, which over a few thousand steps is a few percent. Head: meanP.
"""

from petl_bench.module import RetrievalModule

PROJECTIONS = ("clip.model.visual.proj", "clip.model.text_projection")


class Proj(RetrievalModule):
    """Frozen CLIP except the visual and text output projections."""

    def __init__(self, similarity: str = "meanP", lr: float = 1e-4, **kwargs):
        super().__init__(similarity=similarity, lr=lr, **kwargs)

    def is_trainable(self, name: str) -> bool:
        return name in PROJECTIONS
