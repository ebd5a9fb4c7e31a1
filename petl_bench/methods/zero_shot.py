"""Zero-shot CLIP (Radford et al., ICML 2021, arXiv 2103.00020) as a text-video retriever.

Each frame goes through the frozen image tower and the frame embeddings are pooled by the similarity head (meanP by
default, as CLIP4Clip's zero-shot row). Nothing trains: use ``validate``/``test``; ``fit`` is refused.
"""

from petl_bench.module import RetrievalModule


class ZeroShot(RetrievalModule):
    def is_trainable(self, name: str) -> bool:
        return False
