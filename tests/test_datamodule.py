"""RetrievalDataModule on real dataset formats: options reaching the loaders, caption sampling, batches, the first
seconds of a clip, and the frame cache (exact evaluation frames, random training frames, fallback to decoding)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from petl_bench.data.datamodule import RetrievalDataModule
from petl_bench.data.datasets._common import AnnotationError
from petl_bench.data.frame_cache import (
    CacheSampling,
    FrameCache,
    FrameCacheError,
    cached_positions,
    frames_file_name,
)
from petl_bench.data.synthetic import write_mp4
from tests.test_datasets_e2e import build_didemo, build_vatex, write_clip


def ramp_clip(path: Path, num_frames: int, fps: int = 8, size: int = 32) -> Path:
    """Frame t is a flat grey of level 20 + 5 t: the mean of a decoded frame tells which frame it is."""
    levels = 20 + 5 * np.arange(num_frames)
    frames = np.broadcast_to(levels[:, None, None, None], (num_frames, size, size, 3)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, frames, fps)
    return path


def frame_numbers(frames: torch.Tensor) -> list[int]:
    return [round((f.float().mean().item() - 20) / 5) for f in frames]


def msvd_folder(root: Path, splits: dict[str, dict[str, list[str]]], frames: dict[str, int] | None = None,
                ramp: bool = False) -> Path:
    """An MSVD-format folder: {split}_list.txt, captions_msvd.json and a clip per id (``frames[id]`` long)."""
    root.mkdir(parents=True, exist_ok=True)
    captions = {}
    for split, videos in splits.items():
        (root / f"{split}_list.txt").write_text("\n".join(videos) + "\n")
        captions.update(videos)
    (root / "captions_msvd.json").write_text(json.dumps(captions))
    for k, video_id in enumerate(captions):
        n = (frames or {}).get(video_id, 9)
        path = root / "videos" / f"{video_id}.mp4"
        ramp_clip(path, n) if ramp else write_clip(path, n, seed=k)
    return root


def datamodule(dataset: str, root: Path, **kwargs) -> RetrievalDataModule:
    kwargs = {"backbone": "petl-tiny-vit", "num_frames": 4, "batch_size": 3, "num_workers": 0, **kwargs}
    return RetrievalDataModule(dataset, root=str(root), **kwargs)


SIMPLE = {"train": {"a_1_2": ["one"], "b_3_4": ["two", "deux"], "c_5_6": ["three", "drei", "trois"]},
          "val": {"d_7_8": ["four"]}, "test": {"e_9_10": ["five"], "f_11_12": ["six", "sechs"]}}


# ------------------------------------------------------------------------------------------------------ options
def test_dataset_options_are_checked_against_the_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"msvd has no option 'bogus'; its options are: captions_file, missing"):
        datamodule("msvd", tmp_path, dataset_options={"bogus": 1})
    with pytest.raises(ValueError, match=r"dataset_options\.missing='sometimes' is not accepted by vatex.*'skip'"):
        datamodule("vatex", tmp_path, dataset_options={"missing": "sometimes"})
    with pytest.raises(ValueError, match=r"'train_captions' is not a dataset option; set data\.train_captions"):
        datamodule("msrvtt", tmp_path, dataset_options={"train_captions": "random_one"})
    with pytest.raises(ValueError, match=r"synthetic has no option 'missing'; its options are: none"):
        datamodule("synthetic", tmp_path, dataset_options={"missing": "skip"})
    with pytest.raises(ValueError, match=r"data\.test_split='test': msrvtt has no such split.*test_1k"):
        datamodule("msrvtt", tmp_path, test_split="test")
    with pytest.raises(ValueError, match="data.max_seconds must be positive"):
        datamodule("didemo", tmp_path, max_seconds=0)


def test_dataset_options_reach_the_loader_and_skips_are_counted(tmp_path):
    ids = build_vatex(tmp_path / "vatex", absent=0)
    entries = json.loads((tmp_path / "vatex/vatex_training_v1.0.json").read_text())
    dropped = ids["test"][2]
    (tmp_path / "vatex/vatex_training_v1.0.json").write_text(
        json.dumps([e for e in entries if e["videoID"] != dropped]))
    with pytest.raises(AnnotationError, match=rf"1 of 5 videos listed in .*test_list\.txt have no captions.*{dropped}"):
        datamodule("vatex", tmp_path / "vatex").setup("test")
    dm = datamodule("vatex", tmp_path / "vatex", dataset_options={"missing": "skip"})
    dm.setup("test")
    summary = dm.summary()
    assert summary["test_videos"] == 4 and summary["test_listed_videos"] == 4
    assert summary["test_skipped_without_captions"] == 1 and summary["test_skipped_without_captions_ids"] == [dropped]
    assert summary["dataset_options"] == {"missing": "skip"}

    build_didemo(tmp_path / "didemo")
    listed = datamodule("didemo", tmp_path / "didemo")
    listed.setup("test")
    assert listed.summary()["test_videos"] == 5
    (tmp_path / "didemo/test_list.txt").write_text(
        "\n".join((tmp_path / "didemo/test_list.txt").read_text().split()[:3]) + "\n")
    restricted, whole = datamodule("didemo", tmp_path / "didemo"), datamodule(
        "didemo", tmp_path / "didemo", dataset_options={"use_list": False})
    restricted.setup("test")
    whole.setup("test")
    assert (restricted.summary()["test_videos"], whole.summary()["test_videos"]) == (3, 5)


# ------------------------------------------------------------------------------------------------------ training pairs
def test_train_captions_every_pair_or_one_random_caption_per_video(tmp_path):
    root = msvd_folder(tmp_path, SIMPLE)
    every = datamodule("msvd", root)
    assert len(every.train_dataloader().dataset) == 6 and every.summary()["train_caption_sampling"] == "all"
    one = datamodule("msvd", root, train_captions="random_one")
    pairs = one.train_dataloader().dataset
    assert len(pairs) == 3 and one.summary()["train_caption_sampling"] == "random_one"
    table = one.table("train")
    seen = set()
    for _ in range(40):
        item = pairs[2]
        assert table.caption_video[item["index"]] == item["video_index"] == 2
        seen.add(item["index"])
    assert seen == {3, 4, 5}  # every caption of the third video gets drawn


def test_batches_carry_uint8_frames_masks_tokens_and_indices(tmp_path):
    root = msvd_folder(tmp_path, SIMPLE, frames={"c_5_6": 3})
    dm = datamodule("msvd", root, max_words=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"video", "video_mask", "text", "index", "video_index"}
    assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (3, 4, 3, 32, 32)
    assert batch["text"].shape == (3, 16) and batch["video_mask"].dtype == torch.bool
    videos, captions = dm.test_dataloader()
    video_rows = [row for b in videos for row in b["index"].tolist()]
    caption_batches = list(captions)
    assert video_rows == [0, 1]
    assert [r for b in caption_batches for r in b["index"].tolist()] == [0, 1, 2]
    assert [r for b in caption_batches for r in b["video_index"].tolist()] == [0, 1, 1]
    assert set(caption_batches[0]) == {"text", "index", "video_index"}
    assert dm.eval_pairs("test") == {}


def test_max_seconds_samples_only_the_start_of_a_clip(tmp_path):
    # 40 frames at 8 fps = 5 s; the first 2 s are frames 0..15
    root = msvd_folder(tmp_path, {"train": {"a_1_2": ["x"]}, "test": {"a_1_2": ["x"]}}, frames={"a_1_2": 40},
                       ramp=True)
    whole = datamodule("msvd", root)
    start = datamodule("msvd", root, max_seconds=2)
    for dm in (whole, start):
        dm.setup("test")
    assert frame_numbers(whole.test_dataloader()[0].dataset[0]["video"]) == [5, 15, 25, 35]
    assert frame_numbers(start.test_dataloader()[0].dataset[0]["video"]) == [2, 6, 10, 14]
    assert start.summary()["max_seconds"] == 2
    for _ in range(10):  # training draws stay inside the first 2 s too
        assert max(frame_numbers(start.train_dataloader().dataset[0]["video"])) < 16


# ------------------------------------------------------------------------------------------------------ frame cache
def build_cache(root: Path, dm: RetrievalDataModule, which: str, cache_dir: Path, sampling: CacheSampling,
                only: list[str] | None = None) -> FrameCache:
    cache = FrameCache.create(cache_dir, dm.hparams.dataset, dm.image_size, sampling)
    table = dm.table(which)
    for video_id, path in zip(table.video_ids, table.video_paths):
        if only is None or video_id in only:
            cache.add(video_id, path)
    return cache


@pytest.mark.parametrize("protocol", ["uniform", "fps"])
def test_frame_cache_serves_exactly_the_decoded_evaluation_frames(tmp_path, protocol):
    lengths = {"a_1_2": 41, "b_3_4": 9, "c_5_6": 3, "d_7_8": 100}  # odd lengths, one shorter than 4 frames
    root = msvd_folder(tmp_path / "msvd", {"train": {"a_1_2": ["x"]}, "test": {k: [k] for k in lengths}},
                       frames=lengths)
    decoded = datamodule("msvd", root, frame_protocol=protocol)
    cache = build_cache(root, decoded, "test", tmp_path / "cache", CacheSampling(num_frames=4))
    assert len(cache) == 4
    assert len(cache.entries["d_7_8"].indices) < 100  # long clips are not stored whole
    cached = datamodule("msvd", root, frame_protocol=protocol, frame_cache=str(tmp_path / "cache"))
    plain_items, cached_items = decoded.test_dataloader()[0].dataset, cached.test_dataloader()[0].dataset
    for row in range(4):
        a, b = plain_items[row], cached_items[row]
        assert torch.equal(a["video_mask"], b["video_mask"])
        assert torch.equal(a["video"], b["video"]), f"row {row}"
    # the 3-frame clip is padded and masked: 3 real frames, or 1 at 1 fps (it lasts 3/8 s)
    real = 3 if protocol == "uniform" else 1
    assert cached_items[2]["video_mask"].tolist() == [True] * real + [False] * (4 - real)
    assert not cached_items[2]["video"][real:].any()
    assert cached.summary()["test_videos_from_frame_cache"] == 4


def test_frame_cache_training_draws_a_random_cached_frame_per_segment(tmp_path):
    root = msvd_folder(tmp_path / "msvd", {"train": {"a_1_2": ["x"]}, "test": {"a_1_2": ["x"]}},
                       frames={"a_1_2": 40}, ramp=True)
    dm = datamodule("msvd", root, frame_cache=str(tmp_path / "cache"))
    plain = datamodule("msvd", root)
    build_cache(root, plain, "train", tmp_path / "cache", CacheSampling(num_frames=4, frames_per_segment=3))
    pairs = dm.train_dataloader().dataset
    seen: list[set[int]] = [set() for _ in range(4)]
    for _ in range(60):
        for segment, number in enumerate(frame_numbers(pairs[0]["video"])):
            assert 10 * segment <= number < 10 * (segment + 1)  # 40 frames, 4 segments of 10
            seen[segment].add(number)
    assert all(len(s) >= 3 for s in seen), seen  # more than the middle frame: a real draw among cached frames


def test_uncached_videos_are_decoded_with_a_warning_and_counted(tmp_path, caplog):
    root = msvd_folder(tmp_path / "msvd", SIMPLE)
    plain = datamodule("msvd", root)
    build_cache(root, plain, "test", tmp_path / "cache", CacheSampling(num_frames=4), only=["e_9_10"])
    dm = datamodule("msvd", root, frame_cache=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="petl_bench.data.datamodule"):
        videos = dm.test_dataloader()[0].dataset
    assert "msvd/test: 1 of 2 videos are not in the frame cache" in caplog.text and "f_11_12" in caplog.text
    assert "petl-bench prepare msvd" in caplog.text
    assert torch.equal(videos[1]["video"], plain.test_dataloader()[0].dataset[1]["video"])
    assert dm.summary()["test_videos_from_frame_cache"] == 1


def test_cached_videos_need_no_file_and_a_changed_file_is_decoded_again(tmp_path):
    root = msvd_folder(tmp_path / "msvd", SIMPLE)
    plain = datamodule("msvd", root)
    build_cache(root, plain, "test", tmp_path / "cache", CacheSampling(num_frames=4))
    expected = plain.test_dataloader()[0].dataset[0]["video"]
    (root / "videos/e_9_10.mp4").unlink()
    write_clip(root / "videos/f_11_12.mp4", 12, seed=99)  # re-encoded: another size on disk
    dm = datamodule("msvd", root, frame_cache=str(tmp_path / "cache"), missing_videos="error")
    dm.setup("test")
    assert dm.summary()["test_videos"] == 2 and dm.summary()["test_missing_videos"] == 0
    videos = dm.test_dataloader()[0].dataset
    assert torch.equal(videos[0]["video"], expected)
    assert dm.summary()["test_videos_from_frame_cache"] == 1  # f_11_12 is decoded from its new file
    fresh = datamodule("msvd", root).test_dataloader()[0].dataset  # without the cache: e_9_10 is gone, skipped
    assert len(fresh) == 1 and torch.equal(videos[1]["video"], fresh[0]["video"])


def test_a_cache_of_another_size_dataset_or_duration_is_refused(tmp_path):
    root = msvd_folder(tmp_path / "msvd", SIMPLE)
    build_cache(root, datamodule("msvd", root), "test", tmp_path / "cache", CacheSampling(num_frames=4))
    cache = str(tmp_path / "cache")
    with pytest.raises(FrameCacheError, match=r"holds 32x32 frames but this run needs 48x48.*--image-size 48"):
        datamodule("msvd", root, image_size=48, frame_cache=cache).setup("test")
    with pytest.raises(FrameCacheError, match=r"holds 'msvd' videos, not 'vatex'"):
        datamodule("vatex", root, frame_cache=cache).setup("test")
    with pytest.raises(ValueError, match=r"built for max_seconds=None, this run uses data.max_seconds=30"):
        datamodule("msvd", root, max_seconds=30, frame_cache=cache).setup("test")
    with pytest.raises(FrameCacheError, match=r"is not a frame cache.*petl-bench prepare msvd"):
        datamodule("msvd", root, frame_cache=str(tmp_path)).setup("test")


def test_a_damaged_cache_file_names_itself_and_a_torn_index_line_is_ignored(tmp_path):
    root = msvd_folder(tmp_path / "msvd", SIMPLE)
    build_cache(root, datamodule("msvd", root), "test", tmp_path / "cache", CacheSampling(num_frames=4))
    with open(tmp_path / "cache/index.jsonl", "a") as index:
        index.write('{"video_id": "f_11_12", "file": "fra')  # an append cut short
    assert set(FrameCache.open(tmp_path / "cache").entries) == {"e_9_10", "f_11_12"}
    damaged = tmp_path / "cache/frames" / frames_file_name("e_9_10")
    damaged.write_bytes(damaged.read_bytes()[:200])
    dm = datamodule("msvd", root, frame_cache=str(tmp_path / "cache"))
    with pytest.raises(FrameCacheError, match=rf"cannot read cached frames .*{damaged.name}.*rebuild"):
        dm.test_dataloader()[0].dataset[0]


def test_cached_positions_nearest_frame_and_segment_draws():
    cached = (0, 4, 8, 12, 16, 20, 24, 28, 32, 36)
    # evaluation wants the middles 5, 15, 25, 35 of 4 segments of 40 frames: nearest cached (ties go to the lower)
    assert cached_positions(cached, 40, 8.0, 4) == [1, 4, 6, 9]
    rng = np.random.default_rng(0)
    for _ in range(50):
        positions = cached_positions(cached, 40, 8.0, 4, train=True, rng=rng)
        assert [cached[p] // 10 for p in positions] == [0, 1, 2, 3]
    assert frames_file_name("a@N00_1_x.mov") == "a@N00_1_x.mov.npy"
    assert frames_file_name("a/b c").startswith("a_b_c-") and frames_file_name(".x") != ".x.npy"
