"""The synthetic order benchmark: files decord reads, captions that match the pixels, order pairs that really are
reversed clips, determinism and caching, and the dataset-registry view of it.

Uses the session's small set (`synthetic_root` in conftest: 24 train / 14 test clips of 8 frames at 32x32) and
generates a few more tiny sets into tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from petl_bench.data import get_dataset, load_annotations
from petl_bench.data.datasets._common import AnnotationError
from petl_bench.data.datasets.synthetic import read_synthetic_annotations
from petl_bench.data.synthetic import (
    COLORS,
    OPPOSITE_MOTION,
    SHAPES,
    generate_synthetic,
    order_pair_caption_indices,
    order_pairs,
    still_images,
)

TINY = {"num_train": 4, "num_test": 4, "test_singles": 2, "num_frames": 6, "size": 32, "fps": 4}


def records(root: Path, split: str) -> list[dict]:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def decode_all(path: Path) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    return reader.get_batch(list(range(len(reader)))).asnumpy().astype(np.int16)


def shape_centroids(frames: np.ndarray, color: str) -> np.ndarray:
    """(T, 2) x, y centroid of the pixels close to the caption's colour in each frame."""
    target = np.array(COLORS[color], dtype=np.int16)
    centroids = []
    for frame in frames:
        ys, xs = np.nonzero(np.abs(frame - target).max(axis=-1) < 45)
        assert len(xs) >= 8, f"no {color} shape visible"
        centroids.append((xs.mean(), ys.mean()))
    return np.array(centroids)


# ------------------------------------------------------------------------------------------------------------ files
def test_decord_reads_every_clip_with_the_expected_frames_and_size(synthetic_root):
    for split, count, captions_per_clip in (("train", 24, 2), ("test", 14 + 4, 1)):
        items = records(synthetic_root, split)
        assert len(items) == count
        for item in items:
            frames = decode_all(synthetic_root / "videos" / f"{item['video_id']}.mp4")
            assert frames.shape == (8, 32, 32, 3)
            assert len(item["captions"]) == captions_per_clip
            assert len(set(item["captions"])) == captions_per_clip  # different phrasings
    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    assert manifest["params"] == {
        "num_train": 24, "num_test": 14, "test_singles": 4, "num_frames": 8, "size": 32, "fps": 8, "seed": 0
    }


def test_captions_describe_the_pixels(synthetic_root):
    for split in ("train", "test"):
        for item in records(synthetic_root, split):
            color, shape, motion = item["color"], item["shape"], item["motion"]
            assert color in COLORS and shape in SHAPES and motion in OPPOSITE_MOTION
            for text in item["captions"]:
                words = text.split()
                assert color in words and shape in words and motion in words
            path = synthetic_root / "videos" / f"{item['video_id']}.mp4"
            centroids = shape_centroids(decode_all(path), color)
            dx, dy = centroids[-1] - centroids[0]
            expected = {"left": -dx, "right": dx, "up": -dy, "down": dy}[motion]
            assert expected > 4, f"{item['video_id']} should move {motion}: moved by ({dx:.1f}, {dy:.1f})"
            assert abs(dy if motion in ("left", "right") else dx) < 1.5  # straight along one axis


def test_test_queries_are_unique(synthetic_root):
    items = records(synthetic_root, "test")
    assert len({(i["color"], i["shape"], i["motion"]) for i in items}) == len(items)
    assert len({i["captions"][0] for i in items}) == len(items)


# ------------------------------------------------------------------------------------------------------ order pairs
def test_paired_test_clips_have_a_reversed_twin_captioned_with_the_opposite_direction(synthetic_root):
    items = records(synthetic_root, "test")
    pairs = order_pairs(synthetic_root)
    # the 14 paired clips first, each in exactly one pair; then the 4 singles, in none
    assert sorted(i for pair in pairs for i in pair) == list(range(14))
    assert len(items) == 18 and all(item["pair_id"] is None for item in items[14:])
    for a, b in pairs:
        first, second = items[a], items[b]
        assert first["pair_id"] == second["pair_id"]
        assert (first["color"], first["shape"]) == (second["color"], second["shape"])
        assert second["motion"] == OPPOSITE_MOTION[first["motion"]]
        for caption_a, caption_b in zip(first["captions"], second["captions"]):
            words_a, words_b = caption_a.split(), caption_b.split()
            assert len(words_a) == len(words_b)
            differing = [(x, y) for x, y in zip(words_a, words_b) if x != y]
            assert differing == [(first["motion"], second["motion"])]
        frames_a = decode_all(synthetic_root / "videos" / f"{first['video_id']}.mp4")
        frames_b = decode_all(synthetic_root / "videos" / f"{second['video_id']}.mp4")
        # intra-only coding makes the twins' decoded frames exact reverses, not just close ones
        assert np.array_equal(frames_b, frames_a[::-1])
        assert np.abs(frames_b - frames_a).mean() > 3.0  # and the order really matters


def test_order_pair_caption_indices(synthetic_root):
    assert order_pair_caption_indices(synthetic_root) == list(range(14))  # the paired clips' captions, 1 per clip
    train = records(synthetic_root, "train")
    assert order_pair_caption_indices(train, split="train") == list(range(48))  # 2 captions per clip
    # a clip whose twin is gone is not an order pair: drop clip 0, so clip 1 (now position 0) loses its partner
    assert order_pair_caption_indices(train[1:]) == list(range(2, 46))
    assert order_pairs(train[1:])[0] == (1, 2)


# ------------------------------------------------------------------------------------------- determinism and caching
def test_same_seed_same_frames_other_seed_other_frames(tmp_path, synthetic_root):
    first = generate_synthetic(tmp_path / "a", **TINY, seed=7)
    again = generate_synthetic(tmp_path / "b", **TINY, seed=7)
    other = generate_synthetic(tmp_path / "c", **TINY, seed=8)
    assert records(first, "test") == records(again, "test")
    for item in records(first, "test") + records(first, "train"):
        name = f"{item['video_id']}.mp4"
        assert np.array_equal(decode_all(first / "videos" / name), decode_all(again / "videos" / name))
        assert not np.array_equal(decode_all(first / "videos" / name), decode_all(other / "videos" / name))


def test_generation_is_cached_and_guards_against_other_parameters(tmp_path):
    root = generate_synthetic(tmp_path / "set", **TINY)
    manifest = root / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    clip = root / "videos" / "synth_test_00000.mp4"
    clip_stamp = clip.stat().st_mtime_ns
    generate_synthetic(root, **TINY)
    assert manifest.stat().st_mtime_ns == stamp and clip.stat().st_mtime_ns == clip_stamp  # nothing rewritten

    before = records(root, "test")
    frames_before = decode_all(clip)
    with pytest.raises(ValueError, match="overwrite=True"):
        generate_synthetic(root, **{**TINY, "num_test": 6})
    generate_synthetic(root, **{**TINY, "num_test": 6}, overwrite=True)
    after = records(root, "test")
    assert len(after) == 6 + 2  # pairs, then the singles
    # pair k depends only on (seed, split, k): more pairs extend the smaller set's pairs
    assert after[:4] == before[:4] and np.array_equal(decode_all(clip), frames_before)
    assert json.loads(manifest.read_text())["params"]["num_test"] == 6

    clip.unlink()  # an incomplete set is regenerated
    generate_synthetic(root, **{**TINY, "num_test": 6})
    assert clip.is_file()


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even"):
        generate_synthetic(tmp_path, **{**TINY, "num_test": 5})
    with pytest.raises(ValueError, match="size"):
        generate_synthetic(tmp_path, **{**TINY, "size": 33})
    with pytest.raises(ValueError, match="num_frames"):
        generate_synthetic(tmp_path, **{**TINY, "num_frames": 1})
    assert not (tmp_path / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------------------ stills
def test_still_images_show_the_captioned_colour_and_are_seeded():
    images, captions = still_images(80, size=32, seed=0)
    assert images.shape == (80, 3, 32, 32) and images.dtype == torch.uint8
    assert len(captions) == 80
    # every colour-shape combination twice in 80 images
    assert all(captions.count(c) == 2 for c in set(captions)) and len(set(captions)) == len(COLORS) * len(SHAPES)
    for image, text in zip(images, captions):
        article, color, shape = text.split()
        assert article == ("an" if color[0] in "aeiou" else "a") and color in COLORS and shape in SHAPES
        distance = np.abs(image.permute(1, 2, 0).numpy().astype(np.int16) - np.array(COLORS[color])).max(axis=-1)
        assert (distance < 20).sum() >= 10  # the shape is there in its colour
    again, captions_again = still_images(80, size=32, seed=0)
    other, _ = still_images(80, size=32, seed=1)
    assert captions_again == captions and again.equal(images) and not other.equal(images)


# ---------------------------------------------------------------------------------------------- dataset registry
def test_registry_loads_the_splits_in_file_order(synthetic_root):
    spec = get_dataset("synthetic")
    assert spec.splits == ("train", "test")
    for split in spec.splits:
        items = load_annotations("synthetic", split, synthetic_root)
        assert items == [(r["video_id"], r["captions"]) for r in records(synthetic_root, split)]
        # the annotations folder itself works as the root too
        assert load_annotations("synthetic", split, synthetic_root / "annotations") == items
    video_id = items[0][0]
    videos = synthetic_root / "videos"
    assert spec.find_video(videos, video_id) == videos / f"{video_id}.mp4"
    assert spec.find_video(synthetic_root, video_id) == videos / f"{video_id}.mp4"
    assert spec.find_video(videos, "no_such_clip") is None


def test_malformed_annotations_name_the_file_and_line(tmp_path):
    bad = tmp_path / "annotations" / "test.json"
    bad.parent.mkdir()
    bad.write_text('[\n{"video_id": "a", "captions": ["x"]},\n{"video_id": "b", "captions": ["y"]\n]\n')
    with pytest.raises(AnnotationError, match=r"test\.json: line 4") as err:
        load_annotations("synthetic", "test", tmp_path)
    assert str(bad) in str(err.value)
    bad.write_text('[{"video_id": "a", "captions": []}]')
    with pytest.raises(AnnotationError, match="entry 0 .*captions"):
        read_synthetic_annotations(bad)
    with pytest.raises(FileNotFoundError, match="generate_synthetic"):
        load_annotations("synthetic", "train", tmp_path)


# ------------------------------------------------------------------------------------------------------ frame cache
def test_the_auto_frame_cache_serves_exactly_the_decoded_frames(tmp_path):
    """``data.frame_cache: auto`` on the synthetic set: built on first use, every frame of every clip, so training
    draws and evaluation frames are the very tensors decoding gives (the bench's metrics do not move)."""
    import random

    from petl_bench.data.datamodule import FrameLoader, RetrievalDataModule
    from petl_bench.data.frame_cache import FrameCache

    root = generate_synthetic(tmp_path / "set", num_train=4, num_test=4, test_singles=0, num_frames=8, size=32)
    dm = RetrievalDataModule("synthetic", root=str(root), backbone="petl-tiny-vit", num_frames=4, batch_size=2,
                             num_workers=0, frame_cache="auto")
    assert dm.frame_cache_dir() is None  # nothing built yet: decoding
    dm.prepare_data()
    assert dm.frame_cache_dir() == str(root / "frame_cache")
    cache = FrameCache.open(root / "frame_cache", "synthetic", 32)
    assert len(cache) == 8 and cache.holds_every_frame()
    table = dm.table("train")
    for num_frames, protocol in ((4, "uniform"), (6, "uniform"), (3, "fps")):
        for train in (True, False):
            loaders = [FrameLoader(table, num_frames, 32, protocol, train, cache=c) for c in (None, cache)]
            assert loaders[1].num_cached == len(table.video_ids)
            for row in range(len(table.video_ids)):
                frames = []
                for loader in loaders:
                    random.seed(row)  # a training draw: the same python RNG state on both paths
                    frames.append(loader.load(row))
                assert torch.equal(frames[0][0], frames[1][0]) and torch.equal(frames[0][1], frames[1][1]), \
                    (num_frames, protocol, train, row)
    dm.setup("fit")
    dm.train_dataloader()
    summary = dm.summary()
    assert summary["frame_cache"] == str(root / "frame_cache") and summary["train_videos_from_frame_cache"] == 4
    # another frame size finds no cache of its size and decodes; a run never reads frames of the wrong size
    other = RetrievalDataModule("synthetic", root=str(root), backbone="petl-tiny-vit", image_size=48, num_frames=4,
                                num_workers=0, frame_cache="auto")
    assert other.frame_cache_dir() is None and other.frame_cache is None


def test_the_synthetic_frame_cache_leaves_out_a_clip_it_cannot_decode(tmp_path):
    """A damaged clip is not cached: the run reaches it by decoding and fails (or skips it) as without a cache."""
    from petl_bench.data.frame_cache import FrameCache
    from petl_bench.data.synthetic import build_frame_cache

    root = generate_synthetic(tmp_path / "set", num_train=4, num_test=4, test_singles=0, num_frames=8, size=32)
    broken = min((root / "videos").glob("*.mp4"))
    broken.write_bytes(b"\x00not a video" * 10)
    cache = FrameCache.open(build_frame_cache(root, 32), "synthetic", 32)
    assert len(cache) == 7 and broken.stem not in cache
