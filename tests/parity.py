"""Golden parity fixtures: numbers produced by running a method's official code outside this repository.

A fixture is two files under ``tests/fixtures/parity/``:
- ``<name>.safetensors`` — tensors only: ``input.*`` (frames as uint8, token ids, masks), ``weights.*`` (the seeded
  weights, under the official code's parameter names), ``out.*`` (the official outputs: frame/text embeddings,
  similarity, loss) and ``grad.*`` (gradients of named tensors, official names);
- ``<name>.json`` — provenance (repository, commit, the command that produced it, seeds) and the model config of the
  small CLIP the official code was run with (an open_clip model config, registered here under ``model_name``).

No official code is committed: only these numbers. A test loads the weights into the suite's method (mapping the
official names to the suite's), runs the same inputs and asserts agreement with `assert_rel_close`.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "parity"
TOLERANCE = 1e-5  # relative, fp32


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|: relative to the tensor's scale, so entries near zero do not blow up."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    scale = expected.abs().max().clamp(min=1e-30)
    return float((actual - expected).abs().max() / scale)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOLERANCE) -> float:
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative difference {err:.3e} from the official code exceeds {tol:.0e}"
    return err


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of fixture `name`; registers its small CLIP's open_clip config first."""
    meta = json.loads((FIXTURE_DIR / f"{name}.json").read_text(encoding="utf-8"))
    register_model_config(meta["model_name"], meta["model_cfg"])
    return load_file(str(FIXTURE_DIR / f"{name}.safetensors")), meta


def register_model_config(model_name: str, model_cfg: dict) -> None:
    """Make `model_name` an open_clip model name (as the package does for its tiny configs)."""
    from open_clip import factory

    factory._MODEL_CONFIGS[model_name] = model_cfg  # open_clip's registry of configs (add_model_config reads files)
    assert model_name in open_clip.list_models()


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``<prefix>.``, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def training_outputs(module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `RetrievalModule.training_step` computes on a fixture's inputs, then the backward pass (the gradients stay
    on the module's parameters): frame and text embeddings, similarity, logits and the symmetric InfoNCE loss."""
    from petl_bench.module import symmetric_infonce

    module.zero_grad(set_to_none=True)
    frame_emb = module.encode_video(inputs["video"], inputs["video_mask"])
    text_emb = module.encode_text(inputs["text"])
    similarity = module.similarity(text_emb, frame_emb, inputs["video_mask"])
    logits = module.logit_scale() * similarity
    loss = symmetric_infonce(logits)
    loss.backward()
    return {"frame_emb": frame_emb.detach(), "text_emb": text_emb.detach(), "similarity": similarity.detach(),
            "logits": logits.detach(), "loss": loss.detach()}
