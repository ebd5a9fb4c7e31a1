"""Trainable-only exports: a trained method as ``<name>.safetensors`` (only what trains) + ``<name>.json`` beside it.

The frozen backbone is never exported: it is rebuilt from its source (open_clip tag, file, ``synthetic``), as a run's
checkpoint does (DESIGN.md, "Checkpoints hold only what trains"). The JSON says everything needed to rebuild the
method around the tensors — class path + init args, backbone, pretrained source, open_clip model config, frames,
words, similarity head, parameter counts — plus, when known, the data config the run used (frame protocol) and its
test metrics, and the SHA-256 of the tensors so a JSON is never paired with another run's tensors.

- `export_checkpoint(RUN_DIR_OR_CKPT, OUT)` (``petl-bench export``): from a run folder (``<run>/checkpoints/
  trainable.ckpt``; the record ``<results>/<dataset>/<run>.json`` or ``<run>/test_metrics.json`` give the metrics) or
  from any trainable-only Lightning checkpoint. `export_module` exports a live module.
- `load_export(EXPORT)` rebuilds the method on a fresh backbone and loads the tensors (the tested round trip: the
  run's metrics are reproduced exactly).
- `BackbonePool`: one frozen CLIP serving several methods. Each method is built around a copy of the module tree
  whose frozen tensors *are* the pool's (`share_backbone`), so CLIP is read once; tensors a method trains inside CLIP
  (BitFit's biases, full fine-tuning, projections) are copied on write when its export is loaded, so methods never
  see each other's weights. Methods that rebuild CLIP's layers (peft's LoRA wraps Linears) change only their own copy
  of the tree.

Writes are atomic (temp file + rename): the tensors first, the JSON last, so a JSON that exists names a whole file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from petl_bench.atomic import write_json_atomic

__all__ = ["BackbonePool", "ExportError", "export_checkpoint", "export_command", "export_module", "export_paths",
           "load_export", "read_export", "share_backbone"]

EXPORT_FORMAT = "petl-bench-export"
EXPORT_VERSION = 1
_SUFFIXES = (".safetensors", ".json")


class ExportError(RuntimeError):
    """An export (or the run / checkpoint to export) that is missing, incomplete or inconsistent. Names the file."""


# ---------------------------------------------------------------------------------------------------- file helpers
def export_paths(out: str | Path) -> tuple[Path, Path]:
    """``x``, ``x.json`` or ``x.safetensors`` → (``x.safetensors``, ``x.json``)."""
    out = Path(out).expanduser()
    if out.suffix in _SUFFIXES:
        out = out.with_suffix("")
    return out.parent / f"{out.name}.safetensors", out.parent / f"{out.name}.json"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tensor_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of `state` (detached, on the CPU, contiguous, each its own storage as safetensors wants)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, metadata=metadata)


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors themselves (names, dtypes, shapes, bytes in name order): the same weights give the same
    digest whatever the file's header order (safetensors writes its metadata map in no fixed order)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain(value):
    """Hyper-parameters as JSON data (tuples → lists; anything exotic → its string)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


# ---------------------------------------------------------------------------------------------------- writing
def _export_meta(class_path: str, init_args: dict, counts: dict, open_clip_model: str | None, data: dict | None,
                 metrics: dict | None, source: dict) -> dict:
    import open_clip

    init_args = {k: v for k, v in init_args.items() if not k.startswith("_")}
    quick_gelu = None
    if open_clip_model is not None and open_clip.get_model_config(open_clip_model) is not None:
        quick_gelu = bool(open_clip.get_model_config(open_clip_model).get("quick_gelu", False))
    data = {k: v for k, v in (data or {}).items() if not k.startswith("_")} or None
    return {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "class_path": class_path, "init_args": _plain(init_args),
        "backbone": init_args.get("backbone"), "pretrained": init_args.get("pretrained"),
        "open_clip_model": open_clip_model, "quick_gelu": quick_gelu,
        "num_frames": init_args.get("num_frames"), "max_words": init_args.get("max_words"),
        "similarity": init_args.get("similarity", "meanP"),
        "text_conditioned_temperature": init_args.get("text_conditioned_temperature", 5.0),
        "frame_protocol": (data or {}).get("frame_protocol"),
        "params": counts, "data": _plain(data), "metrics": metrics, "source": _plain(source),
    }


def _write_export(state: dict[str, torch.Tensor], meta: dict, out: str | Path) -> Path:
    tensors_path, json_path = export_paths(out)
    blob = tensor_bytes(state, metadata={"format": EXPORT_FORMAT, "class_path": meta["class_path"]})
    meta = {**meta, "tensors": tensors_path.name, "sha256": tensor_digest(state),
            "params": {**meta["params"], "exported_tensors": len(state),
                       "exported_elements": sum(v.numel() for v in state.values())}}
    write_bytes_atomic(tensors_path, blob)
    write_json_atomic(json_path, meta)  # last: the JSON's existence means the pair is whole
    return json_path


def export_module(module, out: str | Path, data: dict | None = None, metrics: dict | None = None,
                  source: dict | None = None) -> Path:
    """Export a live `RetrievalModule`'s trainable tensors and config; returns the JSON's path."""
    keep = set(module.trainable_names())
    state = {k: v for k, v in module.state_dict().items() if k in keep}
    init_args = dict(module.hparams)
    meta = _export_meta(module.class_path(), init_args, module.parameter_counts(), module.clip.open_clip_model, data,
                        metrics, source or {"kind": "module"})
    return _write_export(state, meta, out)


def _run_files(run_or_ckpt: Path) -> tuple[Path, Path | None, Path | None]:
    """(checkpoint, record JSON or None, test_metrics.json or None) of a run folder or a checkpoint file."""
    if run_or_ckpt.is_dir():
        ckpt = run_or_ckpt / "checkpoints" / "trainable.ckpt"
        if not ckpt.is_file():
            found = sorted(p.name for p in (run_or_ckpt / "checkpoints").glob("*.ckpt"))
            hint = (f"; it holds {', '.join(found)} (pass one of them to export an unfinished run)" if found else
                    ": a run writes it when fitting ends (zero-shot runs train nothing and have none)")
            raise ExportError(f"run folder {run_or_ckpt} has no checkpoints/trainable.ckpt{hint}")
        run_dir = run_or_ckpt
    elif run_or_ckpt.is_file():
        ckpt = run_or_ckpt
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    else:
        raise ExportError(f"{run_or_ckpt} is neither a run folder nor a checkpoint file")
    record = metrics = None
    if run_dir is not None:
        # the sweep layout: R/<dataset>/runs/<name>/ writes its record to R/<dataset>/<name>.json
        candidate = run_dir.parent.parent / f"{run_dir.name}.json"
        record = candidate if run_dir.parent.name == "runs" and candidate.is_file() else None
        metrics = run_dir / "test_metrics.json" if (run_dir / "test_metrics.json").is_file() else None
    return ckpt, record, metrics


def export_checkpoint(run_or_ckpt: str | Path, out: str | Path, pool: BackbonePool | None = None) -> Path:
    """Export a run folder or a trainable-only Lightning checkpoint; returns the JSON's path.

    The method is rebuilt — on `pool`'s backbone when given, else on a randomly initialised one (no weights are
    read) — to check that the checkpoint's tensors are exactly the method's trainable ones and to count parameters.
    """
    from petl_bench.checkpoint import read_checkpoint

    run_or_ckpt = Path(run_or_ckpt).expanduser()
    ckpt_path, record_path, metrics_path = _run_files(run_or_ckpt)
    checkpoint = read_checkpoint(ckpt_path, weights_only=False)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    meta = checkpoint.get("petl_bench") or {}
    class_path = meta.get("method") or hparams.get("_class_path")
    if not class_path:
        raise ExportError(f"{ckpt_path} records no method class (neither petl_bench.method nor hyper_parameters."
                          "_class_path): was it written by petl-bench?")
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_")}
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path else {}
    metrics = record.get("metrics")
    if metrics is None and metrics_path is not None:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")).get("metrics")
    if pool is not None:
        skeleton = build_method(class_path, init_args, pool)
    else:
        with _quiet_random_init():
            skeleton = build_method(class_path, {**init_args, "pretrained": None})
    skeleton.on_load_checkpoint(checkpoint)  # identity + exactly the trainable tensors, or a named error
    open_clip_model = record.get("open_clip_model") or _open_clip_model(init_args.get("backbone"),
                                                                        init_args.get("pretrained"))
    source = {"kind": "checkpoint", "path": str(ckpt_path.resolve()), "global_step": checkpoint.get("global_step"),
              "epoch": checkpoint.get("epoch"), "record": str(record_path.resolve()) if record_path else None,
              "method": record.get("method"), "label": record.get("label"), "dataset": record.get("dataset"),
              "seed": record.get("seed")}
    meta = _export_meta(class_path, init_args, skeleton.parameter_counts(), open_clip_model,
                        checkpoint.get("datamodule_hyper_parameters"), metrics, source)
    return _write_export(checkpoint["state_dict"], meta, out)


@contextlib.contextmanager
def _quiet_random_init():
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly": here that is the point."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _open_clip_model(backbone: str | None, pretrained: str | None) -> str | None:
    """The open_clip config a backbone builds for these weights, without reading them (`architecture_for_weights`)."""
    from petl_bench.backbone import SYNTHETIC_PRETRAINED, _is_path, architecture_for_weights

    if backbone is None:
        return None
    if pretrained is None or pretrained == SYNTHETIC_PRETRAINED or _is_path(str(pretrained)):
        return backbone
    return architecture_for_weights(backbone, pretrained)


# ---------------------------------------------------------------------------------------------------- reading
def read_export(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an export, with the tensor file's hash checked against the JSON's."""
    from safetensors.torch import load

    tensors_path, json_path = export_paths(path)
    if not json_path.is_file():
        raise ExportError(f"export {json_path} does not exist (an export is <name>.safetensors + <name>.json)")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ExportError(f"{json_path} is not valid JSON: {err}") from err
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{json_path} is not a petl-bench export (format {meta.get('format')!r})")
    if not tensors_path.is_file():
        raise ExportError(f"{json_path} names {tensors_path.name}, which is missing beside it")
    try:
        state = load(tensors_path.read_bytes())
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise ExportError(f"{tensors_path} is not a readable safetensors file: {err}") from err
    if tensor_digest(state) != meta.get("sha256"):
        raise ExportError(f"{tensors_path} does not match {json_path.name} (the tensors' SHA-256 differs): the two "
                          "files come from different exports")
    return meta, state


def build_method(class_path: str, init_args: dict, pool: BackbonePool | None = None):
    """Instantiate a method class from its path and init args; on `pool`'s shared backbone when given."""
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    args = {k: v for k, v in init_args.items() if not k.startswith("_")}
    if pool is None:
        return cls(**args)
    with pool.provide(args.get("backbone", "ViT-B-32"), args.get("pretrained", "openai")):
        return cls(**args)


def load_export(path: str | Path, pool: BackbonePool | None = None, device: str | torch.device | None = None):
    """Rebuild an export's method (on `pool`'s shared backbone, or a freshly built one) with its tensors, in eval
    mode. The same checks as a checkpoint: method, backbone and frames agree, exactly the trainable tensors are
    there."""
    meta, state = read_export(path)
    module = build_method(meta["class_path"], meta["init_args"], pool)
    module.on_load_checkpoint({"state_dict": state, "petl_bench": {
        "method": meta["class_path"], "backbone": meta["backbone"], "num_frames": meta["num_frames"]}})
    if pool is not None:
        pool.detach_from_shared(module, state)
    module.load_state_dict(state, strict=False)
    module.mark_trainable()
    if device is not None:
        module.to(device)
    return module.eval()


# ---------------------------------------------------------------------------------------------------- one backbone
def share_backbone(shared: nn.Module) -> nn.Module:
    """A copy of `shared`'s module tree whose parameters and buffers are `shared`'s own tensor objects.

    Building the copy costs only Python objects (no tensor is copied, no weights are read); a method that replaces
    sub-modules (peft) changes its copy's tree, not `shared`'s.
    """
    memo = {id(t): t for t in itertools.chain(shared.parameters(), shared.buffers())}
    return copy.deepcopy(shared, memo)


class BackbonePool:
    """Frozen CLIP backbones built once per (model, pretrained source) and shared by every method built through it.

    `stats` records what was built and how long it took: ``builds`` (CLIPBackbone constructions), ``build_seconds``
    and ``attach_seconds`` (making a method's view of an existing backbone).
    """

    def __init__(self, device: str | torch.device | None = None):
        self.device = device
        self.backbones: dict[tuple[str, str | None], nn.Module] = {}
        self.stats = {"builds": 0, "build_seconds": 0.0, "attach_seconds": 0.0, "attached": 0}

    def get(self, model_name: str, pretrained: str | None) -> nn.Module:
        from petl_bench.backbone import CLIPBackbone

        key = (model_name, pretrained)
        if key not in self.backbones:
            start = time.perf_counter()
            backbone = CLIPBackbone(model_name, pretrained).eval().requires_grad_(False)
            if self.device is not None:
                backbone.to(self.device)  # before any view is made: views then share device tensors
            self.stats["builds"] += 1
            self.stats["build_seconds"] += time.perf_counter() - start
            self.backbones[key] = backbone
        return self.backbones[key]

    @contextlib.contextmanager
    def provide(self, model_name: str, pretrained: str | None):
        """While active, `RetrievalModule.__init__`'s ``CLIPBackbone(backbone, pretrained)`` returns a view of the
        pool's backbone. (module.py builds its backbone itself; this is the one seam that lets a method be built
        around an existing one without changing every method's constructor.)"""
        import petl_bench.module as module_py

        shared = self.get(model_name, pretrained)
        original = module_py.CLIPBackbone

        def view(name: str = "ViT-B-32", source: str | None = "openai"):
            if (name, source) != (model_name, pretrained):
                raise ExportError(f"the method asked for backbone {name!r}/{source!r}, the pool provides "
                                  f"{model_name!r}/{pretrained!r}")
            start = time.perf_counter()
            copy_ = share_backbone(shared)
            self.stats["attach_seconds"] += time.perf_counter() - start
            self.stats["attached"] += 1
            return copy_

        module_py.CLIPBackbone = view
        try:
            yield shared
        finally:
            module_py.CLIPBackbone = original

    def shared_ids(self) -> set[int]:
        return {id(t) for b in self.backbones.values() for t in itertools.chain(b.parameters(), b.buffers())}

    def detach_from_shared(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy on write: every tensor of `state` that is still one of the shared backbone's becomes the module's own
        before loading, so loading one method's CLIP weights (BitFit's biases, ...) never changes another's."""
        shared = self.shared_ids()
        owned = dict(module.named_parameters(remove_duplicate=False))
        buffers = dict(module.named_buffers(remove_duplicate=False))
        for key in state:
            tensor = owned.get(key, buffers.get(key))
            if tensor is None or id(tensor) not in shared:
                continue
            prefix, _, leaf = key.rpartition(".")
            holder = module.get_submodule(prefix) if prefix else module
            if key in owned:
                holder._parameters[leaf] = nn.Parameter(tensor.detach().clone(), requires_grad=False)
            else:
                holder._buffers[leaf] = tensor.detach().clone()


# ---------------------------------------------------------------------------------------------------- CLI
def export_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="petl-bench export",
        description="Export a trained method's trainable tensors (safetensors) and its config (JSON beside them), "
                    "from a run folder or a trainable-only Lightning checkpoint.")
    p.add_argument("source", help="a run folder (<run>/checkpoints/trainable.ckpt) or a .ckpt file")
    p.add_argument("--out", required=True, help="export name: writes OUT.safetensors and OUT.json")
    a = p.parse_args(argv)
    try:
        json_path = export_checkpoint(a.source, a.out)
    except (ExportError, FileNotFoundError, KeyError) as err:
        print(f"petl-bench export: {err}")
        return 1
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    tensors = json_path.with_suffix(".safetensors")
    print(f"exported {meta['class_path'].rsplit('.', 1)[-1]} ({meta['params']['exported_elements']:,} trainable "
          f"values, {tensors.stat().st_size / 2**20:.2f} MiB) to {tensors} + {json_path.name}")
    return 0
