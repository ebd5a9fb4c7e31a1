"""The ``petl-bench`` command.

- ``petl-bench fit|validate|test --config ...``: LightningCLI over any method (``model:``), the one DataModule
  (``data:``) and a Trainer (``trainer:``); frames and words are linked from data to model, the backbone from model to
  data (tokenizer, frame size). The `RetrievalMetrics` callback is always on (``--metrics.*`` configures it).
- ``petl-bench run --config ... --result FILE [--label NAME --dataset D]``: fit then test in one process and write
  the run's record (what `make bench` and sweeps call); ``run --sweep FILE --method M [--dataset D --backbone B
  --seed_everything S --<grid key>=V]`` runs one point of a sweep file (what W&B sweep agents call).
- ``petl-bench params`` (parameter counts), ``synth`` (synthetic clips + backbone), ``prepare`` (check a dataset
  folder, build a frame cache), ``bench`` / ``sweep`` (grids of runs), ``report``, ``dashboard`` (W&B report),
  ``perf`` (training step, memory, checkpoint, evaluation, data-loading and loop costs per method, as ratios to full
  fine-tuning; ``speed`` is its old name): see ``petl-bench <command> --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from petl_bench.data.datamodule import RetrievalDataModule, check_sizes
from petl_bench.metrics import RetrievalMetrics
from petl_bench.module import RetrievalModule

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


class PetlCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RetrievalMetrics, "metrics")
        parser.link_arguments("data.num_frames", "model.init_args.num_frames")
        parser.link_arguments("data.max_words", "model.init_args.max_words")
        parser.link_arguments("model.init_args.backbone", "data.backbone")

    def before_instantiate_classes(self) -> None:
        # Frame, token and batch counts are checked before the model is built: a temporal module sized from a bad
        # num_frames would otherwise fail first, inside a parser error about Union subtypes.
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        data = config.get("data") if config is not None else None
        if data is not None:
            data = data.get("init_args", data)
            check_sizes(data.get("num_frames"), data.get("max_words"), data.get("batch_size"),
                        data.get("eval_batch_size"))

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``: the configured model is built, never the checkpoint's (LightningCLI's default is to parse
        the checkpoint's saved hyper-parameters over the config, class included). A checkpoint of another method,
        backbone or frame count is refused naming both; other differing hyper-parameters are reported, the config
        wins. An unreadable file is named."""
        from petl_bench.checkpoint import check_identity, read_checkpoint

        if not self.config.get("subcommand"):
            return
        cfg = self.config[self.config.subcommand]
        path = cfg.get("ckpt_path")
        if not path or path in ("last", "best", "hpc", "registry") or not Path(path).exists():
            return  # Lightning resolves the names; a missing file is reported by Lightning with its path
        checkpoint = read_checkpoint(path)
        model = cfg.get("model")
        init = dict(vars(model.get("init_args") or {})) if model is not None else {}
        check_identity(checkpoint, {"method": model.get("class_path") if model is not None else None,
                                    "backbone": init.get("backbone"), "num_frames": init.get("num_frames")}, path)
        saved = checkpoint.get("hyper_parameters") or {}
        differ = sorted(k for k, v in init.items() if k in saved and saved[k] != v and not isinstance(v, dict))
        if differ:
            warnings.warn(f"{path}: the config's {', '.join(f'{k}={init[k]!r}' for k in differ)} replace the "
                          f"checkpoint's ({', '.join(f'{k}={saved[k]!r}' for k in differ)})", stacklevel=1)

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with atomic checkpoint writes and the run checkpoint placed in ``default_root_dir``."""
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from petl_bench.checkpoint import AtomicCheckpointIO
        from petl_bench.resume import RunCheckpoint

        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for callback in trainer.callbacks:
            if isinstance(callback, RunCheckpoint):
                callback.bind(trainer.default_root_dir)  # before fit, so that `--ckpt_path last` finds last.ckpt
        return trainer


def make_cli(args: list[str] | None = None, run: bool = True) -> PetlCLI:
    with warnings.catch_warnings():
        # `main` passes sys.argv's tail as `args` on purpose; LightningCLI would warn that both are set
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return PetlCLI(
            RetrievalModule, RetrievalDataModule, subclass_mode_model=True, args=args, run=run,
            save_config_kwargs={"overwrite": True},
        )


# ---------------------------------------------------------------------- params
def params_command(argv: list[str]) -> int:
    from petl_bench.methods import build_method, method_names

    p = argparse.ArgumentParser(prog="petl-bench params",
                                description="Trainable and total parameter counts of methods (no data, no weights).")
    p.add_argument("methods", nargs="*", help="method names (configs/model/<name>.yaml) or YAML paths; default: all")
    p.add_argument("--backbone", default="ViT-B-32")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print a JSON list of {method, backbone, trainable, total}")
    a = p.parse_args(argv)
    rows = []
    for name in a.methods or method_names():
        model = build_method(name, backbone=a.backbone, pretrained=None, num_frames=a.frames, max_words=a.words)
        counts = model.parameter_counts()
        rows.append({"method": name, "backbone": a.backbone, **counts})
        del model
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"parameters ({a.backbone}, {a.frames} frames, {a.words} words)")
    for col in ("method", "trainable", "total", "trainable %"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['trainable']:,}", f"{r['total']:,}", f"{100 * r['trainable'] / r['total']:.3f}")
    Console().print(table)
    return 0


# ---------------------------------------------------------------------- synth
SYNTHETIC_BACKBONE = "petl-tiny-vit"  # configs/backbone/tiny_synthetic.yaml


def synth_command(argv: list[str]) -> int:
    import open_clip

    from petl_bench.data.synthetic import build_frame_cache, default_root, generate_synthetic
    from petl_bench.pretrain import synthetic_checkpoint

    p = argparse.ArgumentParser(prog="petl-bench synth",
                                description="Generate the synthetic clips, their frame cache and the synthetic "
                                            "pre-trained backbone.")
    p.add_argument("--root", default=None, help="output folder (default: <cache>/synthetic-v<N>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-backbone", action="store_true", help="only the clips")
    p.add_argument("--cache-size", type=int, default=None,
                   help="frame size of the frame cache (default: the synthetic backbone's, 32; 0: no cache)")
    a = p.parse_args(argv)
    root = a.root or str(default_root())
    generate_synthetic(root, seed=a.seed, overwrite=a.overwrite)
    print(f"synthetic clips: {root}")
    size = a.cache_size if a.cache_size is not None else open_clip.get_model_config(SYNTHETIC_BACKBONE)["vision_cfg"][
        "image_size"]
    if size:
        print(f"synthetic frame cache: {build_frame_cache(root, size)} ({size} px, every frame; data.frame_cache=auto)")
    if not a.no_backbone:
        print(f"synthetic backbone: {synthetic_checkpoint(SYNTHETIC_BACKBONE)}")
    return 0


def _cpu_threads() -> None:
    """On a machine without a GPU, one intra-op thread per process unless OMP_NUM_THREADS says otherwise.

    The CPU path runs the tiny synthetic models, whose matrices gain nothing from a second thread, beside data-loader
    workers on the same few cores; spinning OpenMP threads then make a step ~70x slower (measured on 2 cores with
    `petl-bench speed --backbone petl-tiny-vit`: 1466 ms with 2 threads under load, 19.7 ms with 1).
    """
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(1)


# command -> "module:function(argv) -> exit code", imported only when used (the harness pulls in W&B, matplotlib)
COMMANDS = {
    "run": "petl_bench.bench.run:run_command",
    "bench": "petl_bench.bench.run:bench_command",
    "sweep": "petl_bench.bench.sweep:sweep_command",
    "report": "petl_bench.bench.report:report_command",
    "dashboard": "petl_bench.bench.dashboard:dashboard_command",
    "perf": "petl_bench.bench.perf:perf_command",
    "speed": "petl_bench.bench.perf:perf_command",  # the old name
    "prepare": "petl_bench.data.prepare:prepare_command",
    "params": "petl_bench.cli:params_command",
    "synth": "petl_bench.cli:synth_command",
    "export": "petl_bench.export:export_command",
    "index": "petl_bench.index:index_command",
    "search": "petl_bench.index:search_command",
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    _cpu_threads()
    if command in TRAINER_COMMANDS:
        make_cli([command, *rest])
        return 0
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    sys.exit(main())
