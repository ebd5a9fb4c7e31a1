"""CLIP through open_clip, and the one explicit forward of both towers that every method hooks into.

`CLIPBackbone` builds an open_clip CLIP from a model name and a pretrained source:
- a hub tag such as ``"openai"`` (the real path on a user's machine; open_clip downloads and caches the weights),
- a local checkpoint file (``pretrained="/path/to/file.safetensors"``; open_clip's own ``load_checkpoint`` reads it),
- ``"synthetic"``: the project's stand-in for OpenAI's weights where they cannot be downloaded — a tiny CLIP trained on
  synthetic still frames (see `petl_bench.pretrain`), built once, cached, and loaded as a local file like any other,
- ``None``: random initialisation (parameter counts, tests).
Tiny model configs shipped in ``petl_bench/model_configs`` are registered with open_clip, so ``petl-tiny-vit`` is a
model name like ``ViT-B-32``.

The forward (`encode_frames`, `encode_tokens`) is written once here as a loop over the transformer blocks. A method
changes it only through the hooks of `CLIPHooks` (DESIGN.md, "How a method plugs in"):
- ``visual_tokens(x, ctx)``: after patch + class + positional embedding, before ``ln_pre`` (VoP inserts prompts here);
- ``text_tokens(x, ctx)``: after the token embedding, before the positional embedding (text prompts; they may move
  ``ctx.eot_index``);
- ``visual_block(i, block, x, ctx)`` / ``text_block(i, block, x, ctx)``: one residual block; the default runs
  `attention_part` and `mlp_part` with their residual adds, so an adapter can sit after either.
- ``visual_readout(x, ctx)``: the last block's output → one class token per frame, (B·T, D), before ``ln_post``; the
  default takes token 0 of each row (a method that merges tokens across frames, TempMe, reads its own layout).
`ForwardContext` carries the batch size B, the frame count T and the masks, so temporal modules can reshape
(B·T, N, D) ↔ (B, T, N, D).

Both towers run their blocks through `run_blocks`, which is where the forward's cost is controlled (issue 12) without
touching what it computes:
- blocks before ``hooks.grad_start(tower)`` (the first block whose forward involves a trainable tensor) run under
  ``torch.no_grad`` while nothing upstream needs a gradient; every block from there on runs with autograd, so a frozen
  block *after* a trainable one still passes gradients back;
- ``hooks.activation_checkpointing``: blocks that need autograd are recomputed in the backward pass instead of keeping
  their activations (non-reentrant `torch.utils.checkpoint`);
- ``hooks.compile_blocks``: each block hook goes through one `torch.compile`d callable (regional compilation: the
  block loop stays Python, each block's hook is a graph, specialised on the block index).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from petl_bench import MODEL_CONFIG_DIR  # noqa: F401  (importing the package registers the tiny configs)

SYNTHETIC_PRETRAINED = "synthetic"
_QUICKGELU_SUFFIX = "-quickgelu"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class ForwardContext:
    """What a hook may need to know about the batch flowing through a tower."""

    tower: str  # "visual" or "text"
    batch_size: int  # B: videos (visual) or captions (text)
    num_frames: int = 1  # T: frames per video; the visual tower sees B·T images
    frame_mask: torch.Tensor | None = None  # (B, T) bool, True for real frames
    attn_mask: torch.Tensor | None = None  # text: additive causal mask (L, L); visual: None
    eot_index: torch.Tensor | None = None  # text: (B,) position of the end-of-text token
    state: dict = field(default_factory=dict)  # scratch space a method may use across blocks of one forward


def attention_part(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention branch of an open_clip residual block, without its residual add: ls_1(Attn(LN1(x)))."""
    return block.ls_1(block.attention(q_x=block.ln_1(x), attn_mask=attn_mask))


def mlp_part(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP branch of an open_clip residual block, without its residual add: ls_2(MLP(LN2(x)))."""
    return block.ls_2(block.mlp(block.ln_2(x)))


class CLIPHooks:
    """Default hooks: the unmodified CLIP forward. Methods override what they change.

    The class attributes below choose how `run_blocks` executes the blocks; they never change the result.
    """

    no_grad_prefix: bool = True  # run blocks before `grad_start` without autograd
    activation_checkpointing: bool = False  # recompute blocks in the backward pass instead of storing activations
    compile_blocks: bool = False  # regional torch.compile of each block hook
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" / "aot_eager": tracing without codegen)
    # inductor's mode: "reduce-overhead" replays each block's kernels as a CUDA graph on a GPU (static shapes:
    # dynamic=False; on a CPU it compiles as "default"), "max-autotune" also benchmarks kernel choices
    compile_mode: str = "default"

    def grad_start(self, tower: str) -> int:
        """Index of the first block of ``tower`` whose forward involves a tensor that trains. Default 0 (every
        block with autograd: always correct); `RetrievalModule` derives it from what trains."""
        return 0

    def visual_tokens(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x

    def text_tokens(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x

    def visual_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + attention_part(block, x, ctx.attn_mask)
        return x + mlp_part(block, x)

    def text_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + attention_part(block, x, ctx.attn_mask)
        return x + mlp_part(block, x)

    def visual_readout(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x[:, 0]


def _is_path(pretrained: str) -> bool:
    return any(sep in pretrained for sep in ("/", "\\")) or Path(pretrained).suffix in _CHECKPOINT_SUFFIXES


def resolve_pretrained(model_name: str, pretrained: str | None) -> str | None:
    """Turn the project's aliases into something open_clip understands (a hub tag or a file path)."""
    if pretrained is None or pretrained in ("", "none", "None"):
        return None
    if pretrained == SYNTHETIC_PRETRAINED:
        from petl_bench.pretrain import synthetic_checkpoint

        return str(synthetic_checkpoint(model_name))
    looks_like_path = _is_path(pretrained)
    if looks_like_path and not Path(pretrained).expanduser().is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint {pretrained!r} does not exist; pass an existing file, a hub tag such as 'openai', "
            f"'{SYNTHETIC_PRETRAINED}' for the project's synthetic stand-in, or null for random weights"
        )
    return str(Path(pretrained).expanduser()) if looks_like_path else pretrained


def architecture_for_weights(model_name: str, pretrained: str | None) -> str:
    """The open_clip model config to build so that the architecture is the one the weights were trained with.

    For a hub tag, open_clip's own pretrained config says which activation the weights were trained with
    (``quick_gelu``: OpenAI's CLIPs used QuickGELU, x·σ(1.702x)). open_clip 3.x builds ``ViT-B-32`` with ``nn.GELU``
    and only warns when the tag disagrees; here the config is switched to its ``-quickgelu`` twin (or back to the plain
    one), so ``ViT-B-32`` + ``openai`` builds ``ViT-B-32-quickgelu``. A tag open_clip does not list for this model is
    an error naming the known ones. Local files and ``None`` keep ``model_name``: a file carries no tag, so the model
    name decides (the synthetic backbone's config declares its QuickGELU itself).
    """
    if pretrained is None or _is_path(pretrained):
        return model_name
    base = model_name.removesuffix(_QUICKGELU_SUFFIX)
    candidates = [name for name in (model_name, base, base + _QUICKGELU_SUFFIX) if name in open_clip.list_models()]
    # open_clip files some tags under the plain name, some under the -quickgelu twin: either names the weights
    tag_cfg = next((cfg for name in candidates if (cfg := open_clip.get_pretrained_cfg(name, pretrained))), None)
    if not tag_cfg:
        known = sorted({t for name in candidates for t in open_clip.list_pretrained_tags_by_model(name)})
        raise ValueError(
            f"open_clip has no pretrained weights {pretrained!r} for {model_name!r}; known tags: "
            f"{', '.join(known) if known else 'none'}. Pass one of them, a checkpoint file, "
            f"'{SYNTHETIC_PRETRAINED}' or null"
        )
    wants_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    for name in candidates:  # model_name first: keep the user's config when it already matches
        if bool(open_clip.get_model_config(name).get("quick_gelu", False)) == wants_quick_gelu:
            return name
    raise ValueError(
        f"pretrained tag {pretrained!r} was trained with {'QuickGELU' if wants_quick_gelu else 'nn.GELU'}, but "
        f"open_clip model {model_name!r} builds the other activation and has no registered twin; "
        "register a model config with the right 'quick_gelu' value and use it"
    )


class CLIPBackbone(nn.Module):
    """An open_clip CLIP plus the pixel normalisation its weights expect.

    The model is built in fp32; mixed precision is the Trainer's job (``precision="bf16-mixed"``).
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "openai"):
        super().__init__()
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip model {model_name!r}; known ViT models include "
                f"{', '.join(m for m in open_clip.list_models() if m.startswith(('ViT-B', 'petl')))}"
            )
        self.model_name = model_name
        self.pretrained = pretrained
        source = resolve_pretrained(model_name, pretrained)
        #: the open_clip model config actually built: ``model_name`` or its variant with the weights' activation
        self.open_clip_model = architecture_for_weights(model_name, source)
        with warnings.catch_warnings():
            # open_clip only warns when a config does not match the tag's weights (e.g. "QuickGELU mismatch"):
            # every such warning would change every result, so here it is an error.
            warnings.filterwarnings("error", message=".*mismatch.*", category=UserWarning)
            try:
                self.model = open_clip.create_model(self.open_clip_model, pretrained=source, device="cpu")
            except UserWarning as err:
                raise ValueError(
                    f"open_clip model {self.open_clip_model!r} does not match pretrained tag {source!r}: {err} "
                    f"Use the model config the tag was trained with (see open_clip.get_pretrained_cfg"
                    f"({model_name!r}, {source!r}))."
                ) from err
        if not hasattr(self.model, "visual") or not hasattr(self.model.visual, "conv1"):
            raise ValueError(f"{model_name!r} is not a ViT CLIP: petl-bench hooks into ViT towers only")
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def quick_gelu(self) -> bool:
        """Whether the towers' MLPs use QuickGELU (OpenAI's weights) rather than nn.GELU."""
        return bool(open_clip.get_model_config(self.open_clip_model).get("quick_gelu", False))

    # -- shapes methods size their modules from
    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def visual_blocks(self) -> nn.ModuleList:
        return self.model.visual.transformer.resblocks

    @property
    def text_blocks(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    @property
    def visual_width(self) -> int:
        return self.model.visual.transformer.width

    @property
    def text_width(self) -> int:
        return self.model.transformer.width

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[1]

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) → float, normalised with the weights' mean/std, on whatever device frames are on."""
        x = frames.float() if frames.dtype == torch.uint8 else frames
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"frames are {tuple(x.shape[-2:])} but {self.model_name} expects {self.image_size}x{self.image_size}; "
                f"set data.image_size (or leave it unset to follow the backbone)"
            )
        return (x - self.pixel_mean) / self.pixel_std


# torch.compile specialises a block hook on the block index: one entry per block and tower, above dynamo's default of 8
_COMPILE_RECOMPILE_LIMIT = 64


def _block_function(hooks: CLIPHooks, tower: str) -> Callable:
    hook = hooks.visual_block if tower == "visual" else hooks.text_block
    if not hooks.compile_blocks:
        return hook
    compiled = hooks.__dict__.setdefault("_compiled_block_hooks", {})
    if tower not in compiled:
        import torch._dynamo

        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), _COMPILE_RECOMPILE_LIMIT))
        if hasattr(config, "accumulated_recompile_limit"):
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * _COMPILE_RECOMPILE_LIMIT)
        mode = hooks.compile_mode if hooks.compile_backend == "inductor" else None  # a mode is inductor's
        compiled[tower] = torch.compile(hook, dynamic=False, backend=hooks.compile_backend, mode=mode)
    return compiled[tower]


def run_blocks(hooks: CLIPHooks, tower: str, blocks: nn.ModuleList, x: torch.Tensor, ctx: ForwardContext
               ) -> torch.Tensor:
    """The block loop of one tower: ``x = hooks.<tower>_block(i, block, x, ctx)`` for every block, executed as the
    hooks' flags say (module docstring); the values are those of the plain loop."""
    block_fn = _block_function(hooks, tower)
    grad = torch.is_grad_enabled()
    # a prefix needs no autograd only while nothing upstream (prompts, trainable embeddings) carries a gradient
    start = hooks.grad_start(tower) if grad and hooks.no_grad_prefix and not x.requires_grad else 0
    for i, block in enumerate(blocks):
        if i < start:
            with torch.no_grad():
                x = block_fn(i, block, x, ctx)
        elif grad and hooks.activation_checkpointing:
            x = checkpoint(block_fn, i, block, x, ctx, use_reentrant=False)
        else:
            x = block_fn(i, block, x, ctx)
    return x


def encode_frames(
    backbone: CLIPBackbone, hooks: CLIPHooks, frames: torch.Tensor, frame_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Frames uint8 (B, T, 3, H, W) → frame embeddings (B, T, D), each frame through the image tower."""
    B, T = frames.shape[:2]
    if frame_mask is None:
        frame_mask = torch.ones(B, T, dtype=torch.bool, device=frames.device)
    ctx = ForwardContext("visual", batch_size=B, num_frames=T, frame_mask=frame_mask)
    visual = backbone.visual
    x = backbone.normalize(frames.flatten(0, 1))
    x = visual.conv1(x.to(visual.conv1.weight.dtype))  # (B·T, width, grid, grid)
    x = x.flatten(2).transpose(1, 2)  # (B·T, grid², width)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = hooks.visual_tokens(x, ctx)
    x = visual.ln_pre(x)
    x = run_blocks(hooks, "visual", backbone.visual_blocks, x, ctx)
    pooled = visual.ln_post(hooks.visual_readout(x, ctx))
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled.view(B, T, -1)


def encode_tokens(backbone: CLIPBackbone, hooks: CLIPHooks, text: torch.Tensor) -> torch.Tensor:
    """Token ids (B, L) → text embeddings (B, D): the EOT token after ``ln_final`` and ``text_projection``.

    The EOT position is the argmax of the ids (CLIP's tokenizer gives EOT the largest id); a text hook that inserts
    tokens must move ``ctx.eot_index`` accordingly.
    """
    model = backbone.model
    B = text.shape[0]
    ctx = ForwardContext("text", batch_size=B, eot_index=text.argmax(dim=-1))
    x = model.token_embedding(text)
    x = hooks.text_tokens(x, ctx)
    L = x.shape[1]
    if L > model.positional_embedding.shape[0]:
        raise ValueError(
            f"text of {L} tokens (prompts included) exceeds {backbone.model_name}'s context of "
            f"{model.positional_embedding.shape[0]}; lower max_words"
        )
    x = x + model.positional_embedding[:L].to(x.dtype)
    ctx.attn_mask = model.attn_mask[:L, :L] if model.attn_mask is not None else None
    x = run_blocks(hooks, "text", backbone.text_blocks, x, ctx)
    x = model.ln_final(x)
    pooled = x[torch.arange(B, device=x.device), ctx.eot_index]
    proj = model.text_projection
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def reference_encode_image(backbone: CLIPBackbone, frames: torch.Tensor) -> torch.Tensor:
    """open_clip's own ``encode_image`` on uint8 frames (N, 3, H, W); tests compare the explicit forward with it."""
    return backbone.model.encode_image(backbone.normalize(frames))


def open_clip_text_features(model: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """open_clip's own text tower on an open_clip CLIP, on a context of any length up to the model's (CLIP4Clip
    tokenises to ``max_words`` < 77 and slices the positional embedding and causal mask to match)."""
    L = text.shape[1]
    x = model.token_embedding(text) + model.positional_embedding[:L]
    x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
    x = model.ln_final(x)
    x = x[torch.arange(text.shape[0]), text.argmax(dim=-1)]
    return x @ model.text_projection


def reference_encode_text(backbone: CLIPBackbone, text: torch.Tensor) -> torch.Tensor:
    """`open_clip_text_features` of a backbone; tests compare the explicit forward with it."""
    return open_clip_text_features(backbone.model, text)
