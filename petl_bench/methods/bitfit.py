"""BitFit (Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", ACL 2022, arXiv 2106.10199), as VoP's "Bias" baseline for text-video retrieval.

The paper states: train only the bias terms of the pretrained transformer, freeze everything else; no module is added,
so the model starts as the pretrained one.

The suite chose (there is no official CLIP/video code for this baseline): every bias vector of both CLIP towers trains
(MultiheadAttention's ``in_proj_bias`` included) — attention in-projection (q, k, v) and out-projection, both MLP
linears, and every LayerNorm's bias (ln_1, ln_2, ln_pre, ln_post, ln_final). CLIP's patch embedding has no bias;
LayerNorm gains, projections and logit_scale stay frozen. That is 171,008 parameters on ViT-B/32 and ViT-B/16 alike
(VoP prints "0.1M"; MV-Adapter trains the same 171,008 biases next to its adapters). Biases are vectors, so the shared
recipe applies no weight decay to them; they train at ``lr`` (``backbone_lr`` is left unset: there is no other group).
Head: meanP, as in VoP's table.
"""

from petl_bench.module import RetrievalModule


class BitFit(RetrievalModule):
    """Frozen CLIP except its bias vectors."""

    def __init__(self, similarity: str = "meanP", lr: float = 1e-4, **kwargs):
        super().__init__(similarity=similarity, lr=lr, **kwargs)

    def is_trainable(self, name: str) -> bool:
        return name.startswith("clip.model.") and name.endswith((".bias", "_bias"))  # MHA: in_proj_bias
