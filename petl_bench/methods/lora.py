"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv 2106.09685) on the
attention and MLP projections of both CLIP towers, built with Hugging Face's ``peft`` library (not hand-written).

The paper states: a frozen weight W gains a trainable low-rank update, W + (α/r)·B·A with A ∈ R^{r×d_in},
B ∈ R^{d_out×r}; B starts at zero so the model starts as the pretrained one; after training, B·A is merged into W and
inference costs nothing extra. Hu et al. adapt Wq and Wv and set α to the first r they try (scaling 1).

peft does (``LoraConfig`` + ``LoraModel``, peft ≥ 0.17; checked on 0.21.2): ``nn.Linear`` layers get ``lora.Linear``
(A kaiming-uniform(a=√5), B zero, dropout on the input of A). open_clip's attention is ``nn.MultiheadAttention``, whose
q, k, v projection is one parameter, ``in_proj_weight`` (3D × D), and whose ``out_proj`` Linear is never *called* (the
functional attention reads its weight). peft offers two routes for it:
- ``target_modules`` = the attention module → peft's ``lora.MultiheadAttention``: LoRA on in_proj (one A, one B for
  q, k, v together) and on out_proj, applied by merging ΔW into the frozen weights before every forward and
  subtracting it after. (W + Δ) − Δ is not W in floating point: the frozen weights drift by rounding at every
  forward once B ≠ 0 (measured here; frozen tensors change after a training step), so a trainable-only checkpoint no
  longer rebuilds the trained model bit for bit. Offered as target ``attn``, not the default.
- ``target_parameters`` = ``attn.in_proj_weight`` → peft's ``lora.ParamWrapper``: W + (α/r)·B·A through
  ``torch.nn.utils.parametrize`` inside the module's forward, nothing mutated. It cannot also wrap ``out_proj.weight``
  of the same module (peft nests wrappers and then cannot find ``attn.out_proj``), and ``lora_dropout`` must be 0.
  This is target ``in_proj``, the default.

This module: targets (any of) ``in_proj`` (ΔW on q, k, v jointly: A r×D, B 3D×r), ``attn`` (in_proj + out_proj via
peft's MHA layer; exclusive with ``in_proj``), ``c_fc`` and ``c_proj`` (the MLP's two Linears), in every block of the
chosen ``towers``; rank r, α and dropout configurable. Only LoRA's A and B train (logit_scale frozen). Defaults (the
suite's): r = 8, α = 8 (scaling 1, as Hu et al. and peft's defaults), dropout 0, targets in_proj + c_fc + c_proj in
both towers: 14·D·r per block = 14·8·12·(768 + 512) = 1,720,320 on ViT-B/32 and B/16 (``attn`` instead of
``in_proj`` adds 2·D·r per block: 1,966,080). ``merged_clip()`` returns a plain open_clip CLIP with every update
merged by peft's ``merge_and_unload`` (no LoRA layers, open_clip's own state-dict keys); it gives the same
embeddings as the unmerged model (tests/test_baselines.py). Head: meanP.
"""

from __future__ import annotations

import copy

from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn

from petl_bench.module import RetrievalModule

TARGETS = ("in_proj", "attn", "c_fc", "c_proj")
TOWER_PREFIXES = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}
ADAPTER_NAME = "default"


class LoRA(RetrievalModule):
    """Frozen CLIP + peft LoRA on the chosen projections of both towers.

    Args:
        rank: r. alpha: α (scaling α / r). dropout: peft's ``lora_dropout`` (must be 0 with ``in_proj``).
        target_modules: any of ``in_proj``, ``attn``, ``c_fc``, ``c_proj`` (see the module docstring).
        towers: ``visual`` and/or ``text``.
    """

    def __init__(self, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 target_modules: tuple[str, ...] = ("in_proj", "c_fc", "c_proj"),
                 towers: tuple[str, ...] = ("visual", "text"), similarity: str = "meanP", lr: float = 1e-4,
                 **kwargs):
        super().__init__(similarity=similarity, lr=lr, **kwargs)
        targets, towers = tuple(target_modules), tuple(towers)
        if not targets or any(t not in TARGETS for t in targets):
            raise ValueError(f"target_modules must be a non-empty subset of {TARGETS}, got {targets}")
        if "in_proj" in targets and "attn" in targets:
            raise ValueError("target_modules: 'attn' (peft's MultiheadAttention LoRA) already adapts in_proj; "
                             "choose 'in_proj' or 'attn', not both")
        if not towers or any(t not in TOWER_PREFIXES for t in towers):
            raise ValueError(f"towers must be a non-empty subset of {tuple(TOWER_PREFIXES)}, got {towers}")
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        modules = [{"attn": "attn", "c_fc": r"mlp\.c_fc", "c_proj": r"mlp\.c_proj"}[t] for t in targets
                   if t != "in_proj"]
        prefixes = "|".join(TOWER_PREFIXES[t].replace(".", r"\.") for t in towers)
        # full names, so that "transformer.resblocks" (text) does not also match inside "visual.transformer..."
        parameters = [f"{TOWER_PREFIXES[t]}.{i}.attn.in_proj_weight" for t in towers
                      for i in range(len(self.clip.visual_blocks if t == "visual" else self.clip.text_blocks))]
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
            target_modules=rf"^({prefixes})\.\d+\.({'|'.join(modules)})$" if modules else None,
            target_parameters=parameters if "in_proj" in targets else None,
        )
        # peft injects its layers into self.clip.model in place; the tuner is kept outside the module tree (its
        # parameters are already registered under clip.model) and serves merge_and_unload.
        self.__dict__["_lora_tuner"] = LoraModel(self.clip.model, config, ADAPTER_NAME)

    def is_trainable(self, name: str) -> bool:
        return ".lora_A." in name or ".lora_B." in name

    def param_lr(self, name: str) -> float:
        return self.hparams.lr  # LoRA's factors are new modules even though they live under clip.

    @property
    def lora_config(self) -> LoraConfig:
        return self._lora_tuner.peft_config[ADAPTER_NAME]

    def merged_clip(self) -> nn.Module:
        """A plain open_clip CLIP with every update merged into its weights (peft's ``merge_and_unload``) — a copy;
        this module keeps its LoRA layers."""
        tuner = copy.deepcopy(self._lora_tuner)  # copies the clip model it wraps
        return tuner.merge_and_unload()
