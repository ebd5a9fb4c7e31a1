"""DDP parity: 2 CPU processes (gloo) with batch B each train like 1 process with batch 2B.

Why it holds: the training loader (petl_bench/resume.py) gives rank r the r-th contiguous share of every global batch
and seeds each item's frame draw by (seed, epoch, item); the loss all-gathers the global batch with gradients; DDP
averages the gradients. What can differ is float summation order (gradient all-reduce, batched matmuls of another
size): tolerance 1e-4 relative on every logged loss, and 1e-4 absolute on the final trainable weights; the retrieval
metrics must be equal. Measured (MV-Adapter, tiny synthetic CLIP, 6 steps): 2.0e-7 relative on the losses, 2.2e-6 on
the weights, identical metrics.
"""

import csv
import json

import pytest
import torch

from petl_bench.cli import main
from tests.conftest import REPO

LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


def losses(root):
    with open(root / "csv" / "version_0" / "metrics.csv") as file:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")}


@pytest.mark.slow
def test_two_process_fit_matches_one_process_with_the_same_global_batch(synthetic_root, synthetic_backbone, tmp_path):
    outcome = {}
    for devices, batch in ((1, 16), (2, 8)):
        out = tmp_path / f"d{devices}"
        main(["run", "--result", str(out / "r.json"), "--config", str(REPO / "configs/trainer/cpu.yaml"),
              "--config", str(REPO / "configs/data/synthetic.yaml"),
              "--config", str(REPO / "configs/model/mv_adapter.yaml"),
              "--config", str(REPO / "configs/backbone/tiny_synthetic.yaml"), f"--data.root={synthetic_root}",
              "--data.num_frames=4", f"--data.batch_size={batch}", "--data.eval_batch_size=16",
              "--data.num_workers=0", "--trainer.max_epochs=2", "--trainer.limit_val_batches=0",
              "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--model.init_args.lr=1e-2",
              "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out}",
              f"--trainer.devices={devices}", *(["--trainer.strategy=ddp_spawn"] if devices == 2 else []),
              f"--trainer.default_root_dir={out}", f"--metrics.save_dir={out}", "--seed_everything=5"])
        state = torch.load(out / "checkpoints" / "trainable.ckpt", weights_only=False)["state_dict"]
        # the metrics file of the test pass (under ddp_spawn the record's metrics stay in the spawned processes)
        outcome[devices] = (losses(out), json.loads((out / "test_metrics.json").read_text()), state)
    (loss1, rec1, w1), (loss2, rec2, w2) = outcome[1], outcome[2]
    assert len(loss1) == 6 and loss1.keys() == loss2.keys()
    worst = max(abs(loss2[s] - loss1[s]) / abs(loss1[s]) for s in loss1)
    print(f"max relative loss difference over {len(loss1)} steps: {worst:.2e}")
    assert worst < LOSS_RTOL, (loss1, loss2)
    weight_diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"max absolute trainable weight difference: {weight_diff:.2e}")
    assert weight_diff < WEIGHT_ATOL
    assert rec1["num_videos"] == rec2["num_videos"] == 18
    assert rec2["metrics"] == rec1["metrics"]
