"""One file per method, each a `RetrievalModule` subclass; ``configs/model/<name>.yaml`` names the class and its
defaults (learning rate, similarity head, sizes). A method "exists" for the benchmark when its config exists."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from petl_bench.paths import CONFIG_DIR


def model_config_path(name_or_path: str) -> Path:
    """``vop`` → configs/model/vop.yaml; a path to a YAML file is taken as it is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        return path
    path = CONFIG_DIR / "model" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown method {name_or_path!r}: no {path}; known methods: {', '.join(method_names())}")
    return path


def method_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def read_model_config(name_or_path: str) -> tuple[str, dict]:
    """The ``model:`` section of a LightningCLI config: (class_path, init_args)."""
    path = model_config_path(name_or_path)
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    model = cfg.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise ValueError(f"{path}: expected a top-level 'model:' with 'class_path' and 'init_args'")
    return model["class_path"], dict(model.get("init_args") or {})


def build_method(name_or_path: str, **overrides):
    """Instantiate a method from its config, with init_args overridden (e.g. backbone=..., pretrained=None)."""
    class_path, init_args = read_model_config(name_or_path)
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**{**init_args, **overrides})
