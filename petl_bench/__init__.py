"""petl-bench: parameter-efficient CLIP adaptation for text-video retrieval, benchmarked side by side."""

from pathlib import Path

import open_clip

# The project's tiny model configs (petl_bench/model_configs/*.json) become open_clip model names like ViT-B-32.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

__version__ = "0.1.0"
