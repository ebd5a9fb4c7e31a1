"""``petl-bench speed``: training-step time, throughput and peak memory of each method, on random weights and inputs.

What it measures is what a method costs on a given device, apart from data loading: one optimiser step (forward,
symmetric InfoNCE, backward, AdamW) on a batch of B videos x T frames and B captions, under the same autocast
precision for every method, after warm-up steps. Weights are random (no download needed; cost does not depend on
their values). Peak memory is the CUDA allocator's peak for the step; on a CPU it is not measured.

Example (the figures in the issue notes came from this)::

    petl-bench speed --backbone ViT-B-16 --batch 32 --frames 12 --words 32 --precision bf16 \
        zero_shot full_finetune cross_modal_adapter mv_adapter vop vop_f
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from petl_bench.methods import build_method, method_names


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, backbone: str, batch: int, frames: int, words: int, precision: str, steps: int,
            warmup: int, device: torch.device) -> dict:
    model = build_method(method, backbone=backbone, pretrained=None, num_frames=frames, max_words=words).to(device)
    model.mark_trainable()
    counts = model.parameter_counts()
    size = model.clip.image_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    video = torch.randint(0, 256, (batch, frames, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    mask = torch.ones(batch, frames, dtype=torch.bool, device=device)
    text = torch.randint(1, 49000, (batch, words), generator=gen)
    text[:, -1] = 49407  # EOT (the largest id) at the end
    batch_dict = {"video": video, "video_mask": mask, "text": text.to(device)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6) if trainable else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            if optimizer is None:  # nothing trains: time the forward pass that evaluation runs
                with torch.no_grad():
                    model.encode_video(video, mask), model.encode_text(batch_dict["text"])
                return
            loss = model.training_step(batch_dict, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    ms = 1000 * statistics.median(times)
    row = {"method": method, "backbone": backbone, "batch": batch, "frames": frames, "words": words,
           "precision": precision, "trainable": counts["trainable"], "total": counts["total"],
           "mode": "train step" if optimizer else "forward only", "ms_per_step": round(ms, 1),
           "videos_per_second": round(batch / (ms / 1000), 1),
           "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
           else None,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    return row


def speed_command(argv: list[str]) -> int:
    import warnings

    p = argparse.ArgumentParser(prog="petl-bench speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="*", help="methods (default: all)")
    p.add_argument("--backbone", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*self.log.*")
    device = torch.device(a.device)
    rows = []
    for method in a.methods or method_names():
        try:
            rows.append(measure(method, a.backbone, a.batch, a.frames, a.words, a.precision, a.steps, a.warmup,
                                device))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the method's model is gone: give its memory back before the next one
        except torch.OutOfMemoryError:
            rows.append({"method": method, "backbone": a.backbone, "error": "out of memory"})
            torch.cuda.empty_cache()
        except RuntimeError as err:  # a failing method is a row of the table, not the end of the table
            rows.append({"method": method, "backbone": a.backbone, "error": str(err).splitlines()[0][:120]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if a.json:
        from pathlib import Path

        from petl_bench.atomic import write_json_atomic

        write_json_atomic(Path(a.json), {"rows": rows})
    from rich.console import Console
    from rich.table import Table

    base = next((r["ms_per_step"] for r in rows if r.get("method") == "full_finetune" and "ms_per_step" in r), None)
    table = Table(title=f"{a.backbone}, batch {a.batch} x {a.frames} frames, {a.words} words, {a.precision}, "
                        f"{rows[0].get('device', a.device) if rows else a.device}")
    for col in ("method", "trainable", "mode", "ms/step", "vs full FT", "videos/s", "peak GiB"):
        table.add_column(col, justify="left" if col in ("method", "mode") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["method"], "", "", r["error"], "", "", "")
            continue
        rel = f"{r['ms_per_step'] / base:.2f}x" if base and r["mode"] == "train step" else ""
        table.add_row(r["method"], f"{r['trainable']:,}", r["mode"], f"{r['ms_per_step']:.1f}", rel,
                      f"{r['videos_per_second']:.0f}", "" if r["peak_memory_gib"] is None else
                      f"{r['peak_memory_gib']:.2f}")
    Console().print(table)
    print(json.dumps(rows))
    return 0
