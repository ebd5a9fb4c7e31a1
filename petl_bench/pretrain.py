"""A synthetic pre-trained backbone: the project's stand-in for OpenAI's CLIP weights where those cannot be downloaded.

A tiny CLIP (``petl-tiny-vit``, registered from ``petl_bench/model_configs``) is trained contrastively on still frames
of the synthetic renderer with captions naming colour, shape and where the shape is ("a red circle at the top left").
It never sees motion: like OpenAI's CLIP, it knows what things look like in one image, and roughly where, not how they
move — which is what the video methods must add. (Without the position words its frame embeddings learn to ignore
position, and no video method could then recover the direction of motion from them.)

The weights are written once to ``<cache>/backbones/<model>-synthetic-v<N>.safetensors`` (atomically, under a file lock so
parallel processes build it once) and loaded back through open_clip's own ``pretrained=<path>``, exactly as a user's
downloaded checkpoint would be. Bump `RECIPE_VERSION` when the recipe changes so stale caches are not reused.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from petl_bench.backbone import open_clip_text_features
from petl_bench.paths import cache_dir

RECIPE_VERSION = 2
RECIPE = {"steps": 600, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.1, "num_images": 4096, "seed": 0,
          "positions": True}


def synthetic_checkpoint(model_name: str = "petl-tiny-vit", rebuild: bool = False) -> Path:
    """Path to the cached synthetic checkpoint for `model_name`, training it first if it is not there yet."""
    out_dir = cache_dir() / "backbones"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model_name}-synthetic-v{RECIPE_VERSION}.safetensors"
    if path.is_file() and not rebuild:
        return path
    with open(out_dir / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the file built
        if path.is_file() and not rebuild:
            return path
        threads = torch.get_num_threads()
        # matrices this small gain nothing from a second thread, and spinning threads stall a loaded machine
        torch.set_num_threads(1)
        try:
            train_synthetic_clip(model_name, path)
        finally:
            torch.set_num_threads(threads)
    return path


def train_synthetic_clip(model_name: str, path: Path, **overrides) -> dict:
    """Train a CLIP from scratch on synthetic stills and save its state dict (safetensors) to `path`."""
    from safetensors.torch import save_file

    from petl_bench.data.synthetic import still_images

    recipe = {**RECIPE, **overrides}
    if model_name.startswith("ViT-B"):
        raise ValueError(f"refusing to pre-train {model_name} on a CPU: the synthetic stand-in is for tiny configs")
    torch.manual_seed(recipe["seed"])
    model = open_clip.create_model(model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(model_name)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images, captions = still_images(recipe["num_images"], size, seed=recipe["seed"], positions=recipe["positions"])
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    pixels = (images.float() / 255.0 - mean) / std
    tokens = tokenizer(captions, context_length=16)
    # captions repeat within a batch (few colours x shapes): every image whose caption matches is a positive
    caption_ids = torch.tensor(_caption_ids(captions))

    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=recipe["steps"], pct_start=0.1)
    gen = torch.Generator().manual_seed(recipe["seed"])
    start = time.time()
    model.train()
    for step in range(recipe["steps"]):
        idx = torch.randint(len(captions), (recipe["batch_size"],), generator=gen)
        img = F.normalize(model.encode_image(pixels[idx]), dim=-1)
        txt = F.normalize(open_clip_text_features(model, tokens[idx]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        same = (caption_ids[idx, None] == caption_ids[None, idx]).float()
        target = same / same.sum(1, keepdim=True)
        loss = (torch.sum(-target * logits.log_softmax(1), 1).mean()
                + torch.sum(-target * logits.t().log_softmax(1), 1).mean()) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    stats = {"model": model_name, "final_loss": float(loss.detach()), "seconds": round(time.time() - start, 1),
             "recipe": recipe, "version": RECIPE_VERSION}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"petl_bench": json.dumps(stats)})
    os.replace(tmp, path)
    return stats


def _caption_ids(captions: list[str]) -> list[int]:
    vocab: dict[str, int] = {}
    return [vocab.setdefault(c, len(vocab)) for c in captions]
