"""Shared fixtures: offline settings, a small synthetic clip set, the cached synthetic backbone."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # see the Makefile: tiny models, shared cores

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ANNOTATIONS = REPO.parent / "shared" / "annotations"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic set generated once per test session: 24 train clips, 7 test order pairs + 4 singles."""
    from petl_bench.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, num_train=24, num_test=14, test_singles=4, num_frames=8, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_backbone() -> Path:
    """The synthetic pre-trained tiny CLIP checkpoint (built once, cached under $PETL_BENCH_CACHE)."""
    from petl_bench.pretrain import synthetic_checkpoint

    return synthetic_checkpoint("petl-tiny-vit")
