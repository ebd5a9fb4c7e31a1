"""A seeded synthetic text-video benchmark whose captions can only be matched by a model that sees frame order.

Each clip shows one coloured shape sliding in a straight line (left, right, up or down) over a plain or mildly
textured still background, and its captions name the colour, the shape and the direction ("a red circle moving
left"). Clips come in order pairs: clip B is clip A's frames reversed, captioned with the same words but the opposite
direction. Anything that pools frames without their order (mean pooling of frame embeddings, zero-shot CLIP) gives
both clips of a pair the same embedding, so it cannot rank the right one first for more than about half of the pair
captions; order-aware temporal modules can. Every test clip belongs to such a pair, and within the test split each
(colour, shape, direction) appears once while there are enough combinations, so each caption has one right answer.

`still_images` renders the same shapes as single frames with captions like "a red circle", to pre-train the tiny
CLIP used when no real checkpoint is available. Generation is deterministic in the seed: clip k of a split depends
only on (seed, split, k), not on how many clips are asked for.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from petl_bench.atomic import write_text_atomic
from petl_bench.data.datasets.synthetic import (  # noqa: F401  (order pairs: re-exported here)
    annotation_file,
    order_pair_caption_indices,
    order_pairs,
    read_synthetic_annotations,
)
from petl_bench.data.frame_cache import FRAME_CACHE_DIR

# Version of the renderer/encoder; bump it when the generated pixels change so cached roots are regenerated.
GENERATOR_VERSION = 4  # 4: 24-frame clips and test singles (see generate_synthetic)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 45),
    "green": (45, 185, 70),
    "cyan": (45, 205, 215),
    "blue": (50, 90, 235),
    "purple": (150, 65, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
MOTIONS = ("left", "right", "up", "down")
OPPOSITE_MOTION = {"left": "right", "right": "left", "up": "down", "down": "up"}
# Caption phrasings; a pair's two clips use the same phrasing so their captions differ only in the direction word.
CAPTION_TEMPLATES = (
    "a {color} {shape} moving {motion}",
    "a {color} {shape} moves {motion}",
    "the {color} {shape} travels {motion}",
    "a {color} {shape} sliding {motion} across the frame",
    "{color} {shape} going {motion}",
)
STILL_TEMPLATE = "a {color} {shape}"

_SPLIT_CODES = {"train": 0, "test": 1, "still": 2}
_AXES = ("horizontal", "vertical")
_AXIS_MOTIONS = {"horizontal": ("left", "right"), "vertical": ("up", "down")}
_TRAIN_CAPTIONS_PER_CLIP = 2
_TEST_CAPTIONS_PER_CLIP = 1


# ---------------------------------------------------------------------------------------------------------- rendering
def _shape_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape centred at offset (0, 0), with a one-pixel soft edge.

    Each shape is a signed distance (negative inside); coverage = clip(0.5 - distance, 0, 1) antialiases the edge.
    Sizes are chosen so all shapes cover a similar area for the same radius.
    """
    if shape == "circle":
        distance = np.hypot(dx, dy) - radius
    elif shape == "square":
        distance = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * radius
    elif shape == "diamond":
        distance = (np.abs(dx) + np.abs(dy) - 1.2 * radius) / math.sqrt(2.0)
    elif shape == "triangle":
        # Upward equilateral triangle around its centroid: three half-planes at inradius r/2 (image y points down).
        r = 1.25 * radius
        s, c = math.sin(math.pi / 6), math.cos(math.pi / 6)
        distance = np.maximum(np.maximum(dy, -c * dx - s * dy), c * dx - s * dy) - r / 2
    elif shape == "cross":
        arm, half_width = 1.05 * radius, 0.38 * radius
        horizontal = np.maximum(np.abs(dx) - arm, np.abs(dy) - half_width)
        vertical = np.maximum(np.abs(dx) - half_width, np.abs(dy) - arm)
        distance = np.minimum(horizontal, vertical)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return np.clip(0.5 - distance, 0.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark-to-mid, low-saturation background (H, W, 3), plain or with a faint still texture of a few sinusoids.

    Kept darker and greyer than every shape colour so the shape always stands out.
    """
    base = rng.uniform(30.0, 100.0) + rng.uniform(-10.0, 10.0, size=3)
    background = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    if rng.random() < 0.5:
        grid = (np.arange(size) + 0.5) / size
        texture = np.zeros((size, size))
        for _ in range(3):
            fx, fy = rng.integers(-3, 4, size=2)
            if fx == 0 and fy == 0:
                fx = 1
            phase = rng.uniform(0.0, 2 * math.pi)
            texture += rng.uniform(3.0, 8.0) * np.sin(2 * math.pi * (fx * grid[None, :] + fy * grid[:, None]) + phase)
        background = background + texture[..., None]
    return background


def _render(
    rng: np.random.Generator, color: str, shape: str, motion: str | None, num_frames: int, size: int,
    centres: list | None = None,
) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 of one shape moving in `motion` (or standing still when `motion` is None).

    When `centres` is a list, the shape's (x, y) centre in each frame is appended to it.
    """
    background = _background(rng, size)
    rgb = np.clip(np.array(COLORS[color], dtype=np.float64) + rng.integers(-12, 13, size=3), 0, 255)
    radius = rng.uniform(0.10, 0.16) * size
    margin = radius * 1.3 + 1.0  # the cross and diamond reach ~1.2 radii from the centre
    perpendicular = rng.uniform(margin, size - margin)
    if motion is None or num_frames == 1:
        along = np.full(num_frames, rng.uniform(margin, size - margin))
    else:
        travel = min(rng.uniform(0.3, 0.55) * size, size - 2 * margin)
        start = rng.uniform(margin, max(margin, size - margin - travel))  # max: travel may fill the frame
        along = start + travel * np.linspace(0.0, 1.0, num_frames)  # towards +x (right) or +y (down)
        if motion in ("left", "up"):
            along = size - along
    if motion in ("up", "down"):
        centre_x, centre_y = np.full(num_frames, perpendicular), along
    else:
        centre_x, centre_y = along, np.full(num_frames, perpendicular)
    pixel = np.arange(size) + 0.5
    dx = pixel[None, None, :] - centre_x[:, None, None]
    dy = pixel[None, :, None] - centre_y[:, None, None]
    coverage = _shape_coverage(shape, dx, dy, radius)[..., None]
    if centres is not None:
        centres.extend(zip(centre_x.tolist(), centre_y.tolist()))
    frames = background[None] * (1.0 - coverage) + rgb * coverage
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def caption(template: str, color: str, shape: str, motion: str | None = None) -> str:
    """Fill a template; "a orange ..." becomes "an orange ..."."""
    text = template.format(color=color, shape=shape, motion=motion)
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


# ---------------------------------------------------------------------------------------------------------- encoding
def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> None:
    """Encode RGB uint8 frames (T, H, W, 3) as H.264/yuv420p mp4, atomically (temporary file, then rename).

    Every frame is an intra frame at a constant quantiser (QP 16): each frame is then coded from its own pixels alone,
    so the same rendered frame decodes to the same bytes wherever it sits in a clip. That makes an order pair's
    decoded frames exact reverses of each other (no codec drift a model could tell the twins apart by), and makes
    every frame a keyframe for cheap random access. The cost is about 10 KiB per 16-frame 64x64 clip. The colour
    error (~2 grey levels) is yuv420p's halved chroma resolution, not the codec.
    """
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    height, width = frames.shape[1:3]
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "16", "preset": "ultrafast"}
        stream.codec_context.gop_size = 1  # intra-only
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode(None))
    os.replace(tmp, path)


def _check_readable(path: Path, num_frames: int, size: int, expected: np.ndarray | None = None) -> None:
    """Fail generation early if decord does not read the clip back as written."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    if len(reader) != num_frames:
        raise RuntimeError(f"{path}: decord counts {len(reader)} frames, {num_frames} were written")
    if expected is not None:
        decoded = reader.get_batch(list(range(num_frames))).asnumpy()
        if decoded.shape != (num_frames, size, size, 3):
            raise RuntimeError(f"{path}: decord reads frames of shape {decoded.shape}, expected {expected.shape}")
        error = np.abs(decoded.astype(np.int16) - expected.astype(np.int16)).mean()
        if error > 6.0:
            raise RuntimeError(f"{path}: decoded frames differ from the rendered ones by {error:.1f} grey levels")


# -------------------------------------------------------------------------------------------------------- generation
_COMBOS = [(color, shape, axis) for color in COLORS for shape in SHAPES for axis in _AXES]


def _test_combos(num_pairs: int, seed: int) -> list[tuple[str, str, str]]:
    """(colour, shape, axis) of each test pair: every combination once, in a seeded order, before any repeats.

    So test queries are unique while there are enough combinations (8 x 5 x 2 = 80 pairs) and each caption has one
    right video. The order is a prefix-stable sequence of permutations: asking for more pairs only appends.
    """
    rng = np.random.default_rng([seed, _SPLIT_CODES["test"], 1])
    rounds = math.ceil(num_pairs / len(_COMBOS))
    order = np.concatenate([rng.permutation(len(_COMBOS)) for _ in range(rounds)]) if rounds else []
    return [_COMBOS[i] for i in order[:num_pairs]]


def _generate_split(
    root: Path, split: str, num_clips: int, num_frames: int, size: int, fps: int, seed: int, singles: int = 0
) -> list[dict]:
    """Render, encode and check the order pairs of one split, then `singles` clips without a twin (test split only);
    returns its annotation records in file order."""
    num_pairs = num_clips // 2
    test_combos = _test_combos(num_pairs + singles, seed) if split == "test" else None
    captions_per_clip = _TEST_CAPTIONS_PER_CLIP if split == "test" else _TRAIN_CAPTIONS_PER_CLIP
    records = []
    for pair_index in range(num_clips // 2):
        # Everything about pair k comes from its own generator: the first k pairs do not depend on how many follow.
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], 0, pair_index])
        if test_combos is not None:
            color, shape, axis = test_combos[pair_index]
        else:
            color, shape, axis = _COMBOS[rng.integers(len(_COMBOS))]
        motion = _AXIS_MOTIONS[axis][rng.integers(2)]
        templates = [CAPTION_TEMPLATES[t] for t in rng.choice(len(CAPTION_TEMPLATES), captions_per_clip, replace=False)]
        forward = _render(rng, color, shape, motion, num_frames, size)
        pair_id = f"{split}_pair_{pair_index:05d}"
        twins = ((forward, motion), (forward[::-1], OPPOSITE_MOTION[motion]))
        for member, (frames, clip_motion) in enumerate(twins):
            video_id = f"synth_{split}_{2 * pair_index + member:05d}"
            path = root / "videos" / f"{video_id}.mp4"
            write_mp4(path, frames, fps)
            _check_readable(path, num_frames, size, expected=frames if pair_index == 0 else None)
            records.append(
                {
                    "video_id": video_id,
                    "captions": [caption(template, color, shape, clip_motion) for template in templates],
                    "color": color,
                    "shape": shape,
                    "motion": clip_motion,
                    "pair_id": pair_id,
                }
            )
    for single in range(singles):
        # A single's (colour, shape, axis) appears nowhere else in the test set (while there are enough of them):
        # an order-blind model can rank it by what it sees in each frame, so the overall numbers reward that too.
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], 1, single])
        color, shape, axis = test_combos[num_pairs + single]
        motion = _AXIS_MOTIONS[axis][rng.integers(2)]
        template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
        frames = _render(rng, color, shape, motion, num_frames, size)
        video_id = f"synth_{split}_{2 * num_pairs + single:05d}"
        path = root / "videos" / f"{video_id}.mp4"
        write_mp4(path, frames, fps)
        records.append({"video_id": video_id, "captions": [caption(template, color, shape, motion)], "color": color,
                        "shape": shape, "motion": motion, "pair_id": None})
    return records


def _records_json(records: list[dict]) -> str:
    """One record per line: readable, diff-friendly, and error line numbers point at a clip."""
    if not records:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def build_frame_cache(root: str | Path, image_size: int) -> Path:
    """Decode every clip of a generated set once into ``root/frame_cache`` at ``image_size`` and return that folder.

    Every frame of every clip is stored (24 per clip by default; 47 MB at 32 px), so a run reading the cache
    (``data.frame_cache: auto``) gets exactly the frames decoding would give, training draws included, for any frame
    count and either frame protocol. Built in a temporary folder and renamed into place: runs started at the same time
    never see half a cache; a cache of another frame size is replaced. A clip that cannot be decoded is left out, so a
    run meets it (and fails on it, or skips it) exactly as it would without the cache.
    """
    from petl_bench.data.frame_cache import CacheSampling, FrameCache, VideoDecodeError, cache_image_size

    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    target = root / FRAME_CACHE_DIR
    if cache_image_size(target) == image_size:
        return target
    clips = int(manifest["params"]["num_frames"])
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{FRAME_CACHE_DIR}-"))
    try:
        cache = FrameCache.create(tmp, "synthetic", image_size, CacheSampling(num_frames=clips, frames_per_segment=1))
        for video in sorted((root / "videos").glob("*.mp4")):
            try:
                cache.add(video.stem, video)
            except VideoDecodeError:  # left out: a run decodes it and fails on it where it would without a cache
                continue
        if cache_image_size(target) not in (None, image_size):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its cache into place first: keep that one
            if cache_image_size(target) != image_size:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_root() -> Path:
    """Where the default synthetic set lives: ``<cache>/synthetic-v<GENERATOR_VERSION>``."""
    from petl_bench.paths import cache_dir

    return cache_dir() / f"synthetic-v{GENERATOR_VERSION}"


def generate_synthetic(
    root: str | Path,
    num_train: int = 512,
    num_test: int = 96,
    test_singles: int = 32,
    num_frames: int = 24,
    size: int = 64,
    fps: int = 8,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic benchmark under `root` (see `petl_bench.data.datasets.synthetic` for the layout).

    Cached: when ``root/manifest.json`` records the same parameters and every file is present, nothing is done.
    The manifest is written last, so an interrupted run is redone. A root generated with other parameters is an
    error unless ``overwrite=True``.

    Args:
        num_train, num_test: clips in order pairs per split; even.
        test_singles: test clips without a twin, after the pairs (default 32: 48 pairs + 32 singles use each of the
            80 colour x shape x axis combinations once). On the pairs an order-blind model can only tie with the twin, which the pessimistic tie rule
            counts as a miss; the singles keep the overall numbers informative about everything else (colour, shape,
            axis of motion).
        num_frames: frames per clip (at least 2: motion needs two). The default 24 is an odd multiple (3x) of the 8
            frames the synthetic config samples, so the middle frames of the 8 segments of a clip and of its reversed
            twin are the same frames in opposite order; with an even multiple (16 = 2 x 8) the twins' evaluation
            frames would be offset by one, a cue that lets order-blind models beat chance on the order pairs.
        size: frame height and width in pixels; even (yuv420p halves the chroma resolution).
        fps: frame rate written into the mp4 (only the "fps" frame protocol reads it).
    Returns:
        `root` as a Path.
    """
    root = Path(root)
    params = {
        "num_train": int(num_train),
        "num_test": int(num_test),
        "test_singles": int(test_singles),
        "num_frames": int(num_frames),
        "size": int(size),
        "fps": int(fps),
        "seed": int(seed),
    }
    _check_params(**params)
    manifest_path = root / "manifest.json"
    wanted = {"generator": "petl_bench.data.synthetic", "version": GENERATOR_VERSION, "params": params}
    if manifest_path.is_file() and not overwrite:
        try:
            existing = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{manifest_path}: line {err.lineno}: malformed JSON ({err.msg}); delete it or pass overwrite=True"
            ) from err
        same = {k: existing.get(k) for k in wanted} == wanted
        if same and _complete(root, params):
            return root
        if not same:
            raise ValueError(
                f"{root} holds a synthetic set generated with {existing.get('params')} (generator version "
                f"{existing.get('version')}), not {params} (version {GENERATOR_VERSION}); pass overwrite=True to "
                "replace it, or choose another root"
            )
    started = time.perf_counter()
    manifest_path.unlink(missing_ok=True)
    shutil.rmtree(root / FRAME_CACHE_DIR, ignore_errors=True)  # the frames of the clips about to be replaced
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for stale in (root / "videos").glob("synth_*.mp4"):
        stale.unlink()
    counts = {}
    for split, num_clips in (("train", params["num_train"]), ("test", params["num_test"])):
        records = _generate_split(
            root, split, num_clips, params["num_frames"], params["size"], params["fps"], params["seed"],
            singles=params["test_singles"] if split == "test" else 0,
        )
        write_text_atomic(root / "annotations" / f"{split}.json", _records_json(records))
        counts[split] = len(records)
    manifest = {
        **wanted,
        "counts": counts,
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "motions": list(MOTIONS),
        "caption_templates": list(CAPTION_TEMPLATES),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return root


def _check_params(
    num_train: int, num_test: int, test_singles: int, num_frames: int, size: int, fps: int, seed: int
) -> None:
    if test_singles < 0:
        raise ValueError(f"test_singles must be non-negative, got {test_singles}")
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if value < 0 or value % 2:
            raise ValueError(f"{name} must be a non-negative even number (clips come in order pairs), got {value}")
    if num_test < 2:
        raise ValueError(f"num_test must be at least 2 (one order pair), got {num_test}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2 (motion needs two frames), got {num_frames}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number of pixels >= 16 (yuv420p halves chroma), got {size}")
    if fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")


def _complete(root: Path, params: dict) -> bool:
    for split in ("train", "test"):
        path = root / "annotations" / f"{split}.json"
        if not path.is_file():
            return False
        try:
            records = read_synthetic_annotations(path)
        except ValueError:
            return False
        if len(records) != params[f"num_{split}"] + (params["test_singles"] if split == "test" else 0):
            return False
        if not all((root / "videos" / f"{r['video_id']}.mp4").is_file() for r in records):
            return False
    return True


# ------------------------------------------------------------------------------------------------------------- stills
def still_images(n: int, size: int = 64, seed: int = 0, positions: bool = False) -> tuple[torch.Tensor, list[str]]:
    """`n` single frames (uint8 ``(n, 3, size, size)``) with captions like "a red circle", for pre-training CLIP.

    The same renderer as the clips without motion; colour-shape combinations cycle in seeded orders so every
    combination appears equally often (within one) in any n. With ``positions=True`` the caption also says where the
    shape is ("a red circle at the top left", "... in the centre"): a CLIP trained on those knows where things are in
    a frame, as OpenAI's CLIP roughly does — what a video model needs to tell motion directions apart.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = np.random.default_rng([seed, _SPLIT_CODES["still"]])
    combos = [(c, s) for c in COLORS for s in SHAPES]
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(max(1, math.ceil(n / len(combos))))])[:n]
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    captions = []
    for i, combo_index in enumerate(order):
        color, shape = combos[combo_index]
        centres: list = []
        images[i] = _render(rng, color, shape, None, 1, size, centres)[0]
        text = caption(STILL_TEMPLATE, color, shape)
        captions.append(f"{text} {position_phrase(*centres[0], size)}" if positions else text)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def position_phrase(x: float, y: float, size: int) -> str:
    """Where a point lies in a frame, in thirds: "at the top left", "on the right", "in the centre", ..."""
    column = ("left", "", "right")[min(2, int(3 * x / size))]
    row = ("top", "", "bottom")[min(2, int(3 * y / size))]
    if row and column:
        return f"at the {row} {column}"
    if row or column:
        return f"{'at' if row else 'on'} the {row or column}"
    return "in the centre"

