"""Partial fine-tuning: only the last block(s) of the towers train — VoP's "Partial" baseline (Huang et al., CVPR 2023,
arXiv 2211.12764; reported with 7.7M trainable parameters). There is no released code for it.

The paper states only "the last block" and "7.7M". The suite chose the literal reading: the last ``blocks`` residual
block(s) of each tower in ``towers`` train — all their weights, biases and LayerNorms — and nothing else (no
projection, no final LayerNorm, logit_scale frozen). On ViT-B/32 and B/16 that is 7,087,872 (visual block, width 768)
+ 3,152,384 (text block, width 512) = **10,240,256**, more than VoP's 7.7M. VoP's number is matched instead by the
last *visual* block plus both output projections (7,087,872 + 393,216 + 262,144 = 7,743,232, with ln_post 7,744,768):
plausibly what it trained, but that is an inference from one rounded number; ``towers: [visual]`` gives the visual
block alone (7,087,872). Trainable CLIP weights train at ``backbone_lr`` when set, else ``lr`` (unset by default: the
block is the only group, as in VoP's table where each baseline is tuned on its own). Head: meanP.
"""

from petl_bench.module import RetrievalModule

TOWERS = ("visual", "text")


class Partial(RetrievalModule):
    """Frozen CLIP except the last ``blocks`` residual blocks of the chosen towers.

    Args:
        blocks: how many of the last blocks of each tower train.
        towers: which towers' last blocks train (``visual``, ``text``).
    """

    def __init__(self, blocks: int = 1, towers: tuple[str, ...] = TOWERS, similarity: str = "meanP",
                 lr: float = 1e-4, **kwargs):
        super().__init__(similarity=similarity, lr=lr, **kwargs)
        towers = tuple(towers)
        if not towers or any(t not in TOWERS for t in towers):
            raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {towers}")
        depth = {"visual": len(self.clip.visual_blocks), "text": len(self.clip.text_blocks)}
        if not 1 <= blocks <= min(depth[t] for t in towers):
            raise ValueError(f"blocks must lie in [1, {min(depth[t] for t in towers)}] for {self.clip.model_name}, "
                             f"got {blocks}")
        prefix = {"visual": "clip.model.visual.transformer.resblocks.", "text": "clip.model.transformer.resblocks."}
        self._trainable_prefixes = tuple(f"{prefix[t]}{i}." for t in towers
                                         for i in range(depth[t] - blocks, depth[t]))

    def is_trainable(self, name: str) -> bool:
        return name.startswith(self._trainable_prefixes)
