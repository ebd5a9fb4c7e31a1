"""Checkpoints and configs that cannot be mixed up, files that cannot be half-written, guards that fail early."""

import errno
import os
from pathlib import Path

import pytest
import torch

from petl_bench.checkpoint import AtomicCheckpointIO, CheckpointError, read_checkpoint
from petl_bench.cli import main, make_cli
from petl_bench.methods import build_method
from tests.conftest import REPO

CPU = ["--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "configs/data/synthetic.yaml")]


def cli_args(root, out, method, frames=4):
    return [*CPU, "--config", str(REPO / f"configs/model/{method}.yaml"),
            "--config", str(REPO / "configs/backbone/tiny_synthetic.yaml"), f"--data.root={root}",
            f"--data.num_frames={frames}", "--data.batch_size=8", "--data.num_workers=0", "--trainer.max_steps=2",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={out}", f"--metrics.save_dir={out}"]


def write_checkpoint(path, method, frames=4, backbone="petl-tiny-vit", **hparams):
    """A trainable-only checkpoint as Lightning writes it (hyper-parameters, class path, petl_bench metadata)."""
    model = build_method(method, backbone=backbone, pretrained=None, num_frames=frames, max_words=16, **hparams)
    checkpoint = {"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.0",
                  "hyper_parameters": {**dict(model.hparams), "_class_path": model.class_path()}}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(("ckpt_kwargs", "named"), [
    ({"method": "vop"}, ["vop.VoP", "mv_adapter.MVAdapter"]),
    ({"method": "mv_adapter", "frames": 12}, ["num_frames: checkpoint 12, configured 4"]),
])
def test_test_refuses_a_checkpoint_of_another_method_or_frame_count(synthetic_root, synthetic_backbone,
                                                                              tmp_path, ckpt_kwargs, named):
    ckpt = write_checkpoint(tmp_path / "other.ckpt", **ckpt_kwargs)
    with pytest.raises(CheckpointError, match="does not belong to the configured model") as err:
        main(["test", *cli_args(synthetic_root, tmp_path, "mv_adapter"), f"--ckpt_path={ckpt}"])
    assert str(ckpt) in str(err.value)
    for text in named:
        assert text in str(err.value)


def test_a_checkpoint_of_another_backbone_is_refused_naming_both():
    from petl_bench.checkpoint import check_identity

    saved = {"petl_bench": {"method": "m.A", "backbone": "ViT-B-32", "num_frames": 12}}
    with pytest.raises(CheckpointError, match="backbone: checkpoint 'ViT-B-32', configured 'petl-tiny-vit'"):
        check_identity(saved, {"method": "m.A", "backbone": "petl-tiny-vit", "num_frames": 12}, "x.ckpt")


def test_explicit_config_beats_the_checkpoints_saved_hyperparameters(synthetic_root, synthetic_backbone, tmp_path):
    """LightningCLI's default parses the checkpoint's hyper-parameters over the config; here the config wins."""
    ckpt = write_checkpoint(tmp_path / "mv.ckpt", "mv_adapter", similarity="text_conditioned", lr=0.5)
    with pytest.warns(UserWarning, match="replace the checkpoint's"):
        cli = make_cli(["test", *cli_args(synthetic_root, tmp_path, "mv_adapter"), f"--ckpt_path={ckpt}",
                        "--model.init_args.pretrained=null"])
    assert cli.model.hparams.similarity == "meanP" and cli.model.hparams.lr != 0.5
    assert cli.model.hparams.pretrained is None


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"PK\x03\x04truncated zip"])
def test_unreadable_checkpoint_is_named(synthetic_root, synthetic_backbone, tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(bad)):
        main(["test", *cli_args(synthetic_root, tmp_path, "mv_adapter"), f"--ckpt_path={bad}"])
    with pytest.raises(CheckpointError, match=str(bad)):
        AtomicCheckpointIO().load_checkpoint(bad)


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fills half-way through writing: the old checkpoint stays whole and readable, no temp file is left."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(1000.0)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert read_checkpoint(path, weights_only=False)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_cli_trainer_writes_checkpoints_atomically(synthetic_root, synthetic_backbone, tmp_path):
    cli = make_cli(cli_args(synthetic_root, tmp_path, "mv_adapter"), run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    from petl_bench.resume import RunCheckpoint

    ckpt = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RunCheckpoint))
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints"  # `--ckpt_path last` looks there


def test_nan_loss_stops_naming_the_step_and_batch():
    model = build_method("mv_adapter", backbone="petl-tiny-vit", pretrained=None, num_frames=2, max_words=8)
    size = model.clip.image_size
    batch = {"video": torch.randint(0, 255, (3, 2, 3, size, size), dtype=torch.uint8),
             "video_mask": torch.ones(3, 2, dtype=torch.bool), "text": torch.randint(1, 100, (3, 8)),
             "index": torch.tensor([7, 8, 9])}
    model.setup("fit")
    assert torch.isfinite(model.training_step(batch, 0))
    with torch.no_grad():
        model.clip.model.logit_scale.fill_(float("nan"))
    from petl_bench.resume import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at global step 0 \(epoch 0, batch 5; dataset items "
                                                  r"\[7, 8, 9\]\)"):
        model.training_step(batch, 5)


# ------------------------------------------------------------------------------------------------ fail fast
def run_args(root, out):
    return ["run", "--result", str(out / "results" / "r.json"), *cli_args(root, out, "mv_adapter")]


def test_unwritable_results_folder_fails_before_training(synthetic_root, synthetic_backbone, tmp_path, monkeypatch):
    import tempfile

    real = tempfile.NamedTemporaryFile

    def refuse(*args, dir=None, **kwargs):  # works as root too, where chmod would not stop a write
        if dir is not None and Path(dir) == tmp_path / "results":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(OSError, match="the results folder .*results is not writable"):
        main(run_args(synthetic_root, tmp_path))
    assert not (tmp_path / "checkpoints").exists(), "nothing should have trained"


def test_too_little_disk_space_fails_before_training(synthetic_root, synthetic_backbone, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1024, 1024))
    with pytest.raises(OSError, match="1024|0 MiB free") as err:
        main(run_args(synthetic_root, tmp_path))
    assert err.value.errno == errno.ENOSPC
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_a_failure_record_that_cannot_be_written_does_not_stop_the_sweep(tmp_path, monkeypatch):
    """Two failing runs on a 'full disk' (the .failed.json write raises ENOSPC): both are tried, the sweep reports."""
    import yaml

    from petl_bench import atomic
    from petl_bench.bench.sweep import SweepSpec, run_sweep

    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump({"dataset": "synthetic", "configs": ["configs/trainer/cpu.yaml"],
                                         "methods": ["zero_shot"], "seeds": [0, 1],
                                         "overrides": {"all": {"trainer.no_such_option": 1}}}))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_json_atomic", full)
    spec = SweepSpec.load(spec_path)
    assert run_sweep(spec, tmp_path, report=False) == 1
    for run in spec.runs(tmp_path):
        assert "no_such_option" in (run.run_dir / "stderr.log").read_text()  # the second run was tried too
        assert not run.failed.exists()

