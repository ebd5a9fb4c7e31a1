"""``petl-bench perf``: what each method costs to train and evaluate, against full fine-tuning, measured in one run.

For every method (``configs/model/*.yaml`` or a list), each in a fresh process so that peak memory is its own:
- one optimiser step (forward, symmetric InfoNCE, backward, AdamW) on B videos × T frames and B captions of random
  inputs, on random weights (no download; cost does not depend on their values): median time over the steps after
  warm-up, clips/s, and peak memory — the CUDA allocator's peak on a GPU, the process's peak RSS (VmHWM) on a CPU;
- each as a ratio to full fine-tuning's row of the same run; zero-shot's frozen forward (``torch.no_grad``) is the
  floor every method's forward pays;
- checkpoint bytes: ``torch.save`` of the trainable tensors only (what `RetrievalModule.on_save_checkpoint` keeps,
  optimiser state excluded) and their ratio to full fine-tuning's.
Then, once per run:
- evaluation at 1k, 5k and 20k videos (one caption each) for both similarity heads: random embeddings of the
  backbone's shape, similarity in caption chunks through the module's heads, streamed T2V / V2T ranks and metrics
  (`petl_bench.metrics.streamed_ranks`), with peak memory over the embeddings' own bytes (target ≤ 1.5×) and the
  embedding time estimated from zero-shot's clips/s;
- the data loader's clips/s decoding generated clips (PyAV, 320×240, 10 s, 30 fps, H.264) against reading the same
  clips' frames from a frame cache;
- the Lightning training loop against a bare PyTorch loop (same model, batch, optimiser) on one method.

``--json FILE`` writes every row plus the machine (device, torch, precision, batch, frames, threads).

Example (experiments/perf/cpu.md came from this)::

    petl-bench perf --methods zero_shot full_finetune cross_modal_adapter mv_adapter mv_adapter_release vop \\
        --json experiments/perf/cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROW_PREFIX = "PERF_ROW "
FULL = "full_finetune"
FLOOR = "zero_shot"
DEFAULT_EVAL_SIZES = (1000, 5000, 20000)
EVAL_MEMORY_TARGET = 1.5


# ------------------------------------------------------------------------------------------------- memory helpers
def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM); None where there is no procfs."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def random_batch(model, batch: int, frames: int, words: int, device: torch.device) -> dict:
    size = model.clip.image_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    video = torch.randint(0, 256, (batch, frames, 3, size, size), dtype=torch.uint8, generator=gen)
    text = torch.randint(1, 49000, (batch, words), generator=gen)
    text[:, -1] = 49407  # EOT (the largest id) at the end
    return {"video": video.to(device), "video_mask": torch.ones(batch, frames, dtype=torch.bool, device=device),
            "text": text.to(device), "index": torch.arange(batch, device=device)}


def trainable_checkpoint_bytes(model) -> int:
    """Bytes of ``torch.save`` of the trainable tensors: the state dict a trainable-only checkpoint holds."""
    keep = set(model.trainable_names())
    buffer = io.BytesIO()
    torch.save({k: v for k, v in model.state_dict().items() if k in keep}, buffer)
    return buffer.getbuffer().nbytes


def build(method: str, spec: dict, device: torch.device):
    from petl_bench.methods import build_method

    options = {"backbone": spec["backbone"], "pretrained": None, "num_frames": spec["frames"],
               "max_words": spec["words"]}
    if spec.get("activation_checkpointing"):
        options["activation_checkpointing"] = True
    if spec.get("compile"):
        options["compile"] = True
        options["compile_mode"] = spec.get("compile_mode", "default")
    model = build_method(method, **options).to(device)
    model.mark_trainable()
    return model


# ------------------------------------------------------------------------------------------------- one method
def measure_method(method: str, spec: dict) -> dict:
    """Time one method's training step (or zero-shot's frozen forward) in this process."""
    device = torch.device(spec["device"])
    process_peak_before = peak_rss_bytes()  # imports included: the fresh process's peak so far
    baseline = rss_bytes()
    reset = reset_peak_rss()
    model = build(method, spec, device)
    counts = model.parameter_counts()
    batch = random_batch(model, spec["batch"], spec["frames"], spec["words"], device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6) if trainable else None
    autocast = _autocast(device, spec["precision"])

    def step() -> None:
        with autocast:
            if optimizer is None:  # nothing trains: the frozen forward evaluation runs
                with torch.no_grad():
                    model.encode_video(batch["video"], batch["video_mask"]), model.encode_text(batch["text"])
                return
            loss = model.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(spec["warmup"]):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) if cuda else max(process_peak_before, peak_rss_bytes())
    # on a CPU, what the method itself adds: the peak since the model was built, over the RSS of the imports
    above = None if cuda or not reset or baseline is None else peak_rss_bytes() - baseline
    return {
        "method": method, "trainable": counts["trainable"], "total": counts["total"],
        "mode": "train step" if optimizer else "forward only",
        "ms_per_step": round(1000 * seconds, 2), "ms_per_step_min": round(1000 * min(times), 2),
        "ms_per_step_max": round(1000 * max(times), 2), "clips_per_s": round(spec["batch"] / seconds, 3),
        "peak_memory_bytes": peak, "peak_memory_kind": "cuda allocator peak" if cuda else "process peak RSS (VmHWM)",
        "baseline_rss_bytes": baseline, "peak_above_baseline_bytes": above,
        "checkpoint_bytes": trainable_checkpoint_bytes(model),
    }


# ------------------------------------------------------------------------------------------------- evaluation
def measure_eval(n: int, head: str, spec: dict) -> dict:
    """Similarity + ranks + metrics of n videos × n captions (one caption per video) on random embeddings."""
    from petl_bench.metrics import ranks_to_metrics, streamed_ranks
    from petl_bench.module import meanp_similarity, text_conditioned_similarity

    device = torch.device(spec["device"])
    dim, frames = spec["embed_dim"], spec["frames"]
    similarity = meanp_similarity if head == "meanP" else text_conditioned_similarity
    with torch.no_grad():  # warm-up: code pages and BLAS buffers the first call maps are not evaluation memory
        warm = torch.randn(64, frames, dim, device=device)
        streamed_ranks(similarity, warm[:, 0], warm, torch.ones(64, frames, dtype=torch.bool, device=device),
                       torch.arange(64, device=device), chunk_size=16)
        del warm
    gen = torch.Generator(device="cpu").manual_seed(n)
    before = rss_bytes() if reset_peak_rss() else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    text = torch.randn(n, dim, generator=gen).to(device)
    video = torch.randn(n, frames, dim, generator=gen).to(device)
    mask = torch.ones(n, frames, dtype=torch.bool, device=device)
    cap_to_vid = torch.arange(n, device=device)
    emb_bytes = sum(t.numel() * t.element_size() for t in (text, video, mask))
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        chunks = -(-n // spec["eval_chunk"])
        limit = spec.get("eval_max_chunks") or None
        sampled = limit is not None and chunks > limit
        t2v, v2t = streamed_ranks(similarity, text, video, mask, cap_to_vid, chunk_size=spec["eval_chunk"],
                                  max_chunks=limit)
        metrics = {"t2v": ranks_to_metrics(t2v), "v2t": ranks_to_metrics(v2t)}
    _sync(device)
    # a sampled run holds the full embeddings and one chunk's working set (the peak), and is timed on `limit` chunks
    seconds = (time.perf_counter() - start) * (chunks / limit if sampled else 1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes() - (before or 0)
    floor = spec.get("floor_clips_per_s")
    return {"videos": n, "captions": n, "head": head, "similarity_and_metrics_s": round(seconds, 3),
            "embed_s_estimated": round(n / floor, 1) if floor else None,
            "embedding_bytes": emb_bytes, "peak_memory_bytes": peak,
            "peak_over_embeddings": round(peak / emb_bytes, 3), "seconds_extrapolated_from_chunks": limit if sampled
            else None, "t2v_R@1": None if sampled else round(metrics["t2v"]["R@1"], 3),
            "target_met": peak <= EVAL_MEMORY_TARGET * emb_bytes}


# ------------------------------------------------------------------------------------------------- data loading
def make_clips(folder: Path, count: int, width: int = 320, height: int = 240, seconds: float = 10.0, fps: int = 30
               ) -> list[Path]:
    """H.264 clips with ordinary GOPs (as downloaded datasets are), moving noise so the codec has work to do."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    paths = []
    base = rng.integers(0, 256, (height + 64, width + 64, 3), dtype=np.uint8)
    for c in range(count):
        path = folder / f"clip{c}.mp4"
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "23"}
            stream.codec_context.thread_count = 1
            for t in range(int(seconds * fps)):
                dy, dx = (t + c) % 64, (2 * t + c) % 64
                frame = np.ascontiguousarray(base[dy:dy + height, dx:dx + width])
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))
        paths.append(path)
    return paths


def measure_loader(spec: dict) -> dict:
    """Clips/s of the two frame paths of `petl_bench.data.datamodule.FrameLoader`: decode + sample + resize, and the
    frame cache's read of the same sampled frames (both padded to T; evaluation sampling; one process, no workers)."""
    from petl_bench.data.frame_cache import CacheSampling, FrameCache
    from petl_bench.data.video import load_video, pad_frames

    frames, size, count, repeats = spec["frames"], spec["image_size"], spec["loader_clips"], spec["loader_repeats"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clips = make_clips(folder, count)
        load_video(clips[0], frames, size)  # warm the decoder libraries
        start = time.perf_counter()
        for _ in range(repeats):
            decoded = [load_video(path, frames, size)[0] for path in clips]
        decode_s = (time.perf_counter() - start) / (repeats * count)
        cache = FrameCache.create(folder / "cache", "perf", size, CacheSampling(num_frames=frames))
        entries = [cache.add(path.stem, path) for path in clips]
        start = time.perf_counter()
        for _ in range(repeats * 10):
            cached = [pad_frames(cache.read(entry, frames), frames)[0] for entry in entries]
        cache_s = (time.perf_counter() - start) / (repeats * 10 * count)
        same = all(torch.equal(a, b) for a, b in zip(decoded, cached))
    return {"clips": count, "source": "H.264 320x240, 10 s, 30 fps (PyAV, crf 23)", "frames": frames,
            "image_size": size, "decode_clips_per_s": round(1 / decode_s, 2), "cache_clips_per_s": round(1 / cache_s, 2),
            "cache_speedup": round(decode_s / cache_s, 2), "same_frames": same}


# ------------------------------------------------------------------------------------------------- Lightning
def measure_loop(method: str, spec: dict) -> dict:
    """Median step time of the same model and batch under a Lightning Trainer and under a bare PyTorch loop."""
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader

    device = torch.device(spec["device"])
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*num_workers.*")
    steps, warmup = spec["steps"], spec["warmup"]

    # bare loop: forward through training_step, backward, AdamW with the module's own parameter groups
    model = build(method, spec, device)
    batch = random_batch(model, spec["batch"], spec["frames"], spec["words"], device)
    groups = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((model.param_lr(name), model.param_weight_decay(name, param)), []).append(param)
    optimizer = torch.optim.AdamW([{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()],
                                  betas=tuple(model.hparams.betas), eps=model.hparams.eps)
    autocast = _autocast(device, spec["precision"])
    bare = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with autocast:
            loss = model.training_step(batch, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            bare.append(time.perf_counter() - start)
    del model, optimizer

    class StepTimer(L.Callback):
        def __init__(self):
            self.times, self._start = [], 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            self.times.append(time.perf_counter() - self._start)

    model = build(method, spec, device)
    cpu_batch = {k: v.cpu() for k, v in batch.items()}
    timer = StepTimer()
    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(spec["precision"], "32-true")
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=warmup + steps,
                        precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
    loader = DataLoader([cpu_batch] * (warmup + steps), batch_size=None)  # the one pre-collated batch, every step
    trainer.fit(model, train_dataloaders=loader)
    lightning = timer.times[warmup:]
    bare_ms, lightning_ms = 1000 * statistics.median(bare), 1000 * statistics.median(lightning)
    return {"method": method, "bare_ms_per_step": round(bare_ms, 2), "lightning_ms_per_step": round(lightning_ms, 2),
            "lightning_overhead": round(lightning_ms / bare_ms - 1, 4)}


# ------------------------------------------------------------------------------------------------- workers
def _worker(argv: list[str]) -> int:
    job = json.loads(argv[0])
    torch.set_num_threads(job["spec"]["threads"])
    print(ROW_PREFIX + json.dumps(run_in_process(job)), flush=True)
    return 0


def run_in_process(job: dict, timeout: float | None = None) -> dict:
    """One measurement in this process; a failure is a row with an ``error``, not the end of the table."""
    kind = job["kind"]
    try:
        if kind == "method":
            row = measure_method(job["method"], job["spec"])
        elif kind == "eval":
            row = measure_eval(job["n"], job["head"], job["spec"])
        elif kind == "loader":
            row = measure_loader(job["spec"])
        else:
            row = measure_loop(job["method"], job["spec"])
    except (RuntimeError, ValueError, torch.OutOfMemoryError, MemoryError) as err:
        row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return row


def run_fresh(job: dict, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh Python process (its own peak memory) and return its row."""
    env = dict(os.environ, OMP_NUM_THREADS=str(job["spec"]["threads"]))
    cmd = [sys.executable, "-m", "petl_bench.bench.perf", "--worker", json.dumps(job)]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    rows = [line[len(ROW_PREFIX):] for line in done.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if not rows:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0][:200]}"}
    return json.loads(rows[-1])


# ------------------------------------------------------------------------------------------------- the command
def add_ratios(rows: list[dict]) -> None:
    """step / memory / checkpoint ratios to full fine-tuning's row; the floor's forward as a ratio of its step."""
    full = next((r for r in rows if r.get("method") == FULL and "ms_per_step" in r), None)
    floor = next((r for r in rows if r.get("method") == FLOOR and "ms_per_step" in r), None)
    for r in rows:
        if "ms_per_step" not in r:
            continue
        if full is not None:
            r["step_vs_full"] = round(r["ms_per_step"] / full["ms_per_step"], 3)
            r["memory_vs_full"] = round(r["peak_memory_bytes"] / full["peak_memory_bytes"], 3)
            if r.get("peak_above_baseline_bytes") and full.get("peak_above_baseline_bytes"):
                r["memory_above_baseline_vs_full"] = round(
                    r["peak_above_baseline_bytes"] / full["peak_above_baseline_bytes"], 3)
            r["checkpoint_vs_full"] = (round(r["checkpoint_bytes"] / full["checkpoint_bytes"], 5)
                                       if full["checkpoint_bytes"] else None)
        if floor is not None and r is not floor:
            r["step_vs_floor"] = round(r["ms_per_step"] / floor["ms_per_step"], 2)


def machine(spec: dict) -> dict:
    device = torch.device(spec["device"])
    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu, "torch": torch.__version__,
            "python": platform.python_version(), "precision": spec["precision"], "batch": spec["batch"],
            "frames": spec["frames"], "words": spec["words"], "threads": spec["threads"],
            "backbone": spec["backbone"], "steps": spec["steps"], "warmup": spec["warmup"],
            "activation_checkpointing": spec["activation_checkpointing"], "compile": spec["compile"],
            "compile_mode": spec.get("compile_mode", "default") if spec["compile"] else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _gib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def _x(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result["machine"]
    console = Console(width=160)
    table = Table(title=f"{m['backbone']}, batch {m['batch']} x {m['frames']} frames, {m['words']} words, "
                        f"{m['precision']}, {m['device']}, {m['threads']} thread(s)")
    for col in ("method", "trainable", "mode", "ms/step", "vs full", "clips/s", "peak GiB", "vs full ",
                "model GiB", "vs full   ", "ckpt MB", "vs full  ", "notes"):
        table.add_column(col.strip(), justify="left" if col in ("method", "mode", "notes") else "right")
    for r in result["methods"]:
        if "error" in r:
            table.add_row(r["method"], *[""] * 11, r["error"])
            continue
        ckpt = r.get("checkpoint_vs_full")
        table.add_row(r["method"], f"{r['trainable']:,}", r["mode"], f"{r['ms_per_step']:.1f}",
                      _x(r.get("step_vs_full")), f"{r['clips_per_s']:.2f}", _gib(r["peak_memory_bytes"]),
                      _x(r.get("memory_vs_full")), _gib(r.get("peak_above_baseline_bytes")),
                      _x(r.get("memory_above_baseline_vs_full")), f"{r['checkpoint_bytes'] / 1e6:.2f}",
                      "" if ckpt is None else f"{100 * ckpt:.3f}%", r.get("notes", ""))
    console.print(table)
    if result.get("eval"):
        table = Table(title="evaluation: similarity + streamed ranks + metrics (random embeddings)")
        for col in ("videos", "head", "seconds", "embed s (est.)", "embeddings GiB", "peak GiB", "peak/emb", "≤1.5x"):
            table.add_column(col, justify="right")
        for r in result["eval"]:
            if "error" in r:
                table.add_row(str(r.get("videos")), r.get("head", ""), r["error"], "", "", "", "", "")
                continue
            table.add_row(str(r["videos"]), r["head"], f"{r['similarity_and_metrics_s']:.2f}"
                          + ("*" if r.get("seconds_extrapolated_from_chunks") else ""),
                          "" if r["embed_s_estimated"] is None else f"{r['embed_s_estimated']:.0f}",
                          _gib(r["embedding_bytes"]), _gib(r["peak_memory_bytes"]), f"{r['peak_over_embeddings']:.2f}",
                          "yes" if r["target_met"] else "NO")
        console.print(table)
    if result.get("loader"):
        r = result["loader"]
        console.print(f"data loader: {r}" if "error" in r else
                      f"data loader ({r['source']}, {r['frames']} frames at {r['image_size']}px): decode "
                      f"{r['decode_clips_per_s']:.1f} clips/s, frame cache {r['cache_clips_per_s']:.1f} clips/s "
                      f"({r['cache_speedup']:.1f}x; same frames: {r['same_frames']})")
    if result.get("loop"):
        r = result["loop"]
        console.print(f"training loop: {r}" if "error" in r else
                      f"training loop ({r['method']}): bare PyTorch {r['bare_ms_per_step']:.1f} ms/step, Lightning "
                      f"{r['lightning_ms_per_step']:.1f} ms/step ({100 * r['lightning_overhead']:+.1f}%)")


def perf_command(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    from petl_bench.methods import method_names

    p = argparse.ArgumentParser(prog="petl-bench perf", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods_pos", nargs="*", metavar="METHOD", help="methods (default: all configs/model/*.yaml)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods (same as the positional list); 'none' for only the other rows")
    p.add_argument("--backbone", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the block hooks")
    p.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                   help="inductor's mode with --compile (reduce-overhead: CUDA graphs on a GPU)")
    p.add_argument("--eval-sizes", type=int, nargs="*", default=list(DEFAULT_EVAL_SIZES),
                   help="videos (= captions) for the evaluation rows; none to skip")
    p.add_argument("--eval-heads", nargs="*", default=["meanP", "text_conditioned"])
    p.add_argument("--eval-chunk", type=int, default=256,
                   help="captions per similarity chunk (256: 20k x 20k within 1.5x the embeddings' memory)")
    p.add_argument("--eval-max-chunks", type=int, default=0,
                   help="score only this many caption chunks per pass and extrapolate the time (peak memory is "
                        "unaffected: the embeddings are whole); 0: all")
    p.add_argument("--loader-clips", type=int, default=4, help="generated clips for the loader rows; 0 to skip")
    p.add_argument("--loader-repeats", type=int, default=2)
    p.add_argument("--loop-method", default="cross_modal_adapter",
                   help="method for Lightning vs bare loop; 'none' to skip")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement process")
    p.add_argument("--json", default=None, help="also write everything to this JSON file")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (quick looks, tests): peak memory is then not each method's own")
    a = p.parse_args(argv)
    measure = run_in_process if a.in_process else run_fresh
    methods = a.methods or a.methods_pos or method_names()
    methods = [] if methods == ["none"] else methods  # only the evaluation / loader / loop rows
    device = torch.device(a.device)
    spec = {"backbone": a.backbone, "batch": a.batch, "frames": a.frames, "words": a.words,
            "precision": a.precision or ("bf16" if device.type == "cuda" else "fp32"), "steps": a.steps,
            "warmup": a.warmup, "threads": a.threads, "device": a.device,
            "activation_checkpointing": a.activation_checkpointing, "compile": a.compile,
            "compile_mode": a.compile_mode, "eval_chunk": a.eval_chunk, "eval_max_chunks": a.eval_max_chunks, "loader_clips": a.loader_clips, "loader_repeats": a.loader_repeats}

    def progress(what: str) -> None:
        print(f"[perf] {what}", file=sys.stderr, flush=True)

    rows = []
    for method in methods:
        progress(f"method {method}")
        row = measure({"kind": "method", "method": method, "spec": spec}, a.timeout)
        rows.append({"method": method, **row})
    add_ratios(rows)
    result = {"machine": {**machine(spec), "fresh_process_per_measurement": not a.in_process}, "methods": rows}

    from petl_bench.backbone import CLIPBackbone

    clip = CLIPBackbone(a.backbone, None)
    spec.update(embed_dim=clip.embed_dim, image_size=clip.image_size)
    del clip
    floor = next((r for r in rows if r.get("method") == FLOOR and "clips_per_s" in r), None)
    spec["floor_clips_per_s"] = floor["clips_per_s"] if floor else None
    result["eval"] = []
    for n in a.eval_sizes:
        for head in a.eval_heads:
            progress(f"eval {n} x {head}")
            result["eval"].append({"videos": n, "head": head,
                                   **measure({"kind": "eval", "n": n, "head": head, "spec": spec}, a.timeout)})
    if a.loader_clips > 0:
        progress("data loader")
        result["loader"] = measure({"kind": "loader", "spec": spec}, a.timeout)
    if a.loop_method != "none":
        progress(f"Lightning vs bare loop ({a.loop_method})")
        result["loop"] = measure({"kind": "loop", "method": a.loop_method, "spec": spec}, a.timeout)
    if a.json:
        from petl_bench.atomic import write_json_atomic

        write_json_atomic(Path(a.json), result)
    print_tables(result)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker(sys.argv[2:]))
    sys.exit(perf_command(sys.argv[1:]))
