"""The `petl-bench` command: params, and fit/test through LightningCLI with the shipped configs."""

import json
import shutil

import pytest

from petl_bench.cli import main
from tests.conftest import REPO

CPU = ["--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "configs/data/synthetic.yaml")]
TINY = ["--config", str(REPO / "configs/backbone/tiny_synthetic.yaml")]


def _tiny_args(root, tmp_path, method):
    return [*CPU, "--config", str(REPO / f"configs/model/{method}.yaml"), *TINY, f"--data.root={root}",
            "--data.num_frames=4", "--data.batch_size=8", "--data.num_workers=0", "--trainer.max_steps=2",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}", f"--metrics.save_dir={tmp_path}"]


def test_params_json_reports_full_finetune_and_zero_shot(capsys):
    assert main(["params", "--backbone", "ViT-B-32", "--json", "full_finetune", "zero_shot"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {"method": "full_finetune", "backbone": "ViT-B-32", "trainable": 123_540_993, "total": 151_277_313},
        {"method": "zero_shot", "backbone": "ViT-B-32", "trainable": 0, "total": 151_277_313},
    ]


def test_params_accepts_a_config_path_and_rejects_unknown_methods(capsys):
    path = REPO / "configs/model/cross_modal_adapter.yaml"
    assert main(["params", "--backbone", "ViT-B-32", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["trainable"] == 519_168
    with pytest.raises(KeyError, match="unknown method 'no_such_method'"):
        main(["params", "--json", "no_such_method"])


def test_fit_then_test_through_lightning_cli(synthetic_root, synthetic_backbone, tmp_path):
    main(["fit", *_tiny_args(synthetic_root, tmp_path, "cross_modal_adapter")])
    main(["test", *_tiny_args(synthetic_root, tmp_path, "zero_shot")])
    record = json.loads((tmp_path / "test_metrics.json").read_text())
    assert record["num_videos"] == 18 and record["num_captions"] == 18
    assert set(record["metrics"]) >= {"t2v/R@1", "v2t/R@1", "t2v/MdR", "order_pairs/accuracy", "order_pairs/t2v/R@1"}
    assert record["metrics"]["order_pairs/num_captions"] == 14  # the singles are not order pairs


def test_run_writes_a_complete_record(synthetic_root, synthetic_backbone, tmp_path):
    result = tmp_path / "cma.json"
    assert main(["run", "--result", str(result), "--method", "cross_modal_adapter",
                 *_tiny_args(synthetic_root, tmp_path, "cross_modal_adapter")]) == 0
    rec = json.loads(result.read_text())
    assert rec["method"] == "cross_modal_adapter" and rec["backbone"] == "petl-tiny-vit"
    assert rec["params"]["trainable"] > 0 and rec["params"]["total"] > rec["params"]["trainable"]
    assert rec["efficiency"]["checkpoint_bytes"] > 0 and rec["efficiency"]["train_steps"] == 2
    assert rec["data"]["test_videos"] == 18 and rec["data"]["frame_protocol"] == "uniform"
    assert 0 <= rec["metrics"]["t2v/R@1"] <= 100
    assert rec["config"]["model"]["init_args"]["backbone"] == "petl-tiny-vit"


@pytest.mark.slow
def test_ddp_evaluation_of_the_real_module_equals_single_process(synthetic_root, synthetic_backbone, tmp_path):
    """2 CPU processes (gloo) on an odd set — 17 videos, one clip missing — give exactly the 1-process metrics."""
    root = tmp_path / "odd"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns("frame_cache"))  # the clips, not their cache
    first = json.loads((root / "annotations/test.json").read_text())[0]["video_id"]
    (root / "videos" / f"{first}.mp4").unlink()
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        args = [a for a in _tiny_args(root, out, "zero_shot") if not a.startswith("--trainer.max_steps")]
        main(["test", *args, f"--trainer.devices={devices}", "--data.batch_size=3",
              *(["--trainer.strategy=ddp_spawn"] if devices == 2 else [])])
        results[devices] = json.loads((out / "test_metrics.json").read_text())
    assert results[1]["num_videos"] == 17
    assert results[2]["metrics"] == results[1]["metrics"]


@pytest.mark.slow
def test_ddp_fit_gathers_the_global_batch(synthetic_root, synthetic_backbone, tmp_path):
    """Training under 2-process CPU DDP: the loss sees both processes' pairs (all-gather with gradients)."""
    main(["fit", *_tiny_args(synthetic_root, tmp_path, "cross_modal_adapter"), "--trainer.devices=2",
          "--trainer.strategy=ddp_spawn", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
          "--trainer.log_every_n_steps=1"])
    lines = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    global_batches = [float(r["train/global_batch"]) for r in rows if r.get("train/global_batch")]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert global_batches == [16.0, 16.0], "each process's loss must see both processes' 8 pairs"
    assert all(0 < loss < 10 for loss in losses)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_metrics(synthetic_root, synthetic_backbone, tmp_path):
    """Seeded end to end: shuffling, random frames per segment in 2 loader workers, init, training."""
    metrics = []
    for attempt, seed in enumerate((7, 7, 8)):
        out = tmp_path / f"attempt{attempt}"
        result = out / "record.json"
        args = [a for a in _tiny_args(synthetic_root, out, "mv_adapter") if not a.startswith("--data.num_workers")]
        main(["run", "--result", str(result), *args, "--data.num_workers=2", f"--seed_everything={seed}",
              "--model.init_args.lr=1e-2"])
        metrics.append(json.loads(result.read_text())["metrics"])
    assert metrics[0] == metrics[1]
    assert metrics[2] != metrics[0], "another seed should give another run: is the seed used at all?"
