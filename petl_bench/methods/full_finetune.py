"""Full fine-tuning, the CLIP4Clip recipe (Luo et al., Neurocomputing 2022, arXiv 2104.08860), meanP head.

Every CLIP weight trains at ``backbone_lr`` (1e-7 in CLIP4Clip) except what CLIP4Clip freezes: the token and
positional embeddings of the text tower and conv1, the class embedding, the positional embedding and ln_pre of the
visual tower. The temperature trains too and is clamped to ≤ 100. New modules (none for meanP) would train at ``lr``.
For OpenAI ViT-B/32 that is 123,540,993 trainable parameters of 151,277,313 (CLIP4Clip quotes 123.52M).
"""

from petl_bench.module import RetrievalModule

# parameter names (relative to the open_clip model) that CLIP4Clip keeps frozen
CLIP4CLIP_FROZEN = (
    "token_embedding.",
    "positional_embedding",
    "visual.conv1.",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.ln_pre.",
)


class FullFinetune(RetrievalModule):
    def __init__(self, *args, backbone_lr: float | None = 1e-7, train_logit_scale: bool = True, **kwargs):
        super().__init__(*args, backbone_lr=backbone_lr, train_logit_scale=train_logit_scale, **kwargs)

    def is_trainable(self, name: str) -> bool:
        if not name.startswith("clip.model."):
            return True  # anything a subclass adds
        inner = name[len("clip.model."):]
        if inner == "logit_scale":
            return self.hparams.train_logit_scale
        return not inner.startswith(CLIP4CLIP_FROZEN)
