"""End to end on each of the five benchmarks: a tiny copy in the real layout, fit + test through `petl-bench`.

Each copy keeps the real file names and formats and real video ids from the project's shared/annotations folder
(files too large to ship there — MSRVTT_data.json, raw-captions.pkl, the VATEX caption JSON, DiDeMo's train/val
moments — are written here in their real formats), pairs them with generated clips named after those ids (the real
containers: .mp4, MSVD's .avi, DiDeMo's odd extensions and bare names), and trains a method for two steps on the
synthetic tiny backbone before testing on every test video. Sizes are odd on purpose (7 training videos, 5 test
videos, batches of 4), and some clips are shorter than the frame count.

The builders are shared with test_datamodule.py, test_prepare.py and test_bad_input.py.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from petl_bench.cli import main
from petl_bench.data.synthetic import write_mp4
from tests.conftest import REPO, SHARED_ANNOTATIONS

TRAIN, VAL, TEST = 7, 3, 5  # videos per split in the tiny copies


def shared(dataset: str) -> Path:
    folder = SHARED_ANNOTATIONS / dataset
    if not folder.is_dir():
        pytest.skip(f"real {dataset} annotations not found at {folder}")
    return folder


# ------------------------------------------------------------------------------------------------------ clips
def clip_frames(num_frames: int, width: int = 40, height: int = 30, seed: int = 0) -> np.ndarray:
    """RGB uint8 (T, H, W, 3): a bright square sliding over a flat background whose colour depends on the seed."""
    rng = np.random.default_rng(seed)
    background = rng.integers(20, 200, size=3)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:] = background
    side = max(4, min(width, height) // 3)
    for t in range(num_frames):
        x = int((width - side) * t / max(1, num_frames - 1))
        frames[t, height // 3: height // 3 + side, x: x + side] = 255 - background
    return frames


def write_clip(path: Path, num_frames: int = 7, width: int = 40, height: int = 30, fps: int = 8, seed: int = 0) -> Path:
    """A clip at ``path``: H.264 mp4 bytes whatever the name (as DiDeMo's .mov / .m4v / bare names hold), except
    ``.avi``, written as MPEG-4 part 2 in AVI like MSVD's YouTubeClips."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = clip_frames(num_frames, width, height, seed)
    if path.suffix == ".avi":
        import av

        with av.open(str(path), mode="w", format="avi") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))
    else:
        write_mp4(path, frames, fps)
    return path


def _clip_length(k: int) -> int:
    """Frames of the k-th clip of a copy: mostly longer than 4 frames, every third one shorter (pad + mask)."""
    return 3 if k % 3 == 2 else 6 + k % 4


# ------------------------------------------------------------------------------------------------------ copies
def build_msrvtt(root: Path, n_train: int = TRAIN, n_test: int = TEST, n_val: int = VAL) -> dict:
    """The real split csv files (all 9,000 / 1,000 ids), an MSRVTT_data.json of the real format with two captions for
    every train id, and videos for the first few ids only (of the training list, of the 500 validation ids the shipped
    config holds out of it, and of the test list): the other listed videos are missing (skip policy)."""
    from petl_bench.data.protocol import holdout_ids

    source = shared("msrvtt")
    root.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.csv"):
        (root / path.name).symlink_to(path)
    with open(source / "MSRVTT_train.9k.csv", newline="") as file:
        train = [row["video_id"] for row in csv.DictReader(file)]
    with open(source / "MSRVTT_JSFUSION_test.csv", newline="") as file:
        test = [row["video_id"] for row in csv.DictReader(file)]
    sentences = [{"caption": f"clip {video_id} shows scene {k}", "video_id": video_id, "sen_id": k * len(train) + i}
                 for k in range(2) for i, video_id in enumerate(train)]
    videos = [{"video_id": v, "category": 0, "url": "", "start time": 0.0, "end time": 10.0, "split": "train", "id": i}
              for i, v in enumerate(train)]
    (root / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    held = holdout_ids(train, 500, seed=0)
    rest = [v for v in train if v not in set(held)]
    for k, video_id in enumerate(rest[:n_train] + held[:n_val] + test[:n_test]):
        write_clip(root / "videos" / f"{video_id}.mp4", _clip_length(k), seed=k)
    return {"train": rest[:n_train], "val": held[:n_val], "test": test[:n_test], "listed_train": len(train),
            "listed_test": len(test), "held_out": held}


def build_msvd(root: Path, n_train: int = TRAIN, n_val: int = VAL, n_test: int = TEST) -> dict:
    """Split lists of real ids and a raw-captions.pkl (video id -> list of token lists, CLIP4Clip's format) made from
    the real captions of those ids; videos are .avi."""
    source = shared("msvd")
    captions = json.loads((source / "captions_msvd.json").read_text())
    ids = {}
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        listed = [line.strip() for line in (source / f"{split}_list.txt").read_text().splitlines() if line.strip()]
        ids[split] = listed[:count]
    root.mkdir(parents=True, exist_ok=True)
    raw = {}
    for split, chosen in ids.items():
        (root / f"{split}_list.txt").write_text("\n".join(chosen) + "\n")
        for video_id in chosen:
            raw[video_id] = [caption.split() for caption in captions[video_id][:3]]
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(raw))
    for k, video_id in enumerate(ids["train"] + ids["val"] + ids["test"]):
        write_clip(root / "videos" / f"{video_id}.avi", _clip_length(k), seed=k)
    return ids


def build_vatex(root: Path, n_train: int = TRAIN, n_val: int = VAL, n_test: int = TEST, absent: int = 1) -> dict:
    """HGR lists of real ids and an official-format caption file (list of {videoID, enCap, chCap}); the last
    ``absent`` test videos have no file (their YouTube source is gone)."""
    source = shared("vatex")
    ids = {}
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        listed = [line.strip() for line in (source / f"{split}_list.txt").read_text().splitlines() if line.strip()]
        ids[split] = listed[:count]
        (root / f"{split}_list.txt").write_text("\n".join(ids[split]) + "\n")
        entries += [{"videoID": v, "enCap": [f"{v} happens {k}" for k in range(10)], "chCap": ["x"] * 10}
                    for v in ids[split]]
    (root / "vatex_training_v1.0.json").write_text(json.dumps(entries))
    on_disk = ids["train"] + ids["val"] + ids["test"][: len(ids["test"]) - absent]
    for k, video_id in enumerate(on_disk):
        write_clip(root / "videos" / f"{video_id}.mp4", _clip_length(k), seed=k)
    return {**ids, "absent": ids["test"][len(ids["test"]) - absent:]}


def build_activitynet(root: Path, n_train: int = TRAIN, n_test: int = TEST) -> dict:
    """train.json / val_1.json restricted to real entries (real sentences), their id lists, and videos named
    ``v_<ytid>.mp4`` or ``<ytid>.mp4`` (both namings circulate)."""
    source = shared("activitynet")
    root.mkdir(parents=True, exist_ok=True)
    ids = {}
    for split, ids_file, count in (("train", "train_ids.json", n_train), ("val_1", "val_ids.json", n_test)):
        data = json.loads((source / f"{split}.json").read_text())
        chosen = list(data)[:count]
        ids[split] = chosen
        (root / f"{split}.json").write_text(json.dumps({v: data[v] for v in chosen}, indent=1))
        (root / ids_file).write_text(json.dumps(chosen))
    for k, video_id in enumerate(ids["train"] + ids["val_1"]):
        name = video_id if k % 2 else video_id[2:]  # v_<ytid> or <ytid>
        write_clip(root / "videos" / f"{name}.mp4", _clip_length(k), seed=k)
    ids["paragraphs"] = {
        split: [" ".join(s.strip() for s in json.loads((root / f"{split}.json").read_text())[v]["sentences"])
                for v in ids[split]] for split in ("train", "val_1")}
    return ids


def build_didemo(root: Path, n_train: int = TRAIN, n_val: int = VAL, n_test: int = TEST) -> dict:
    """{split}_data.json of real moments (real file names with .mov / .m4v / .avi / none), split lists, and videos
    under the original names, a re-encoded ``<stem>.mp4`` or a bare stem. Train and val take other real test videos
    (DiDeMo's train and val moment files are not shipped)."""
    source = shared("didemo")
    moments = json.loads((source / "test_data.json").read_text())
    by_video: dict[str, list[dict]] = {}
    for moment in moments:
        by_video.setdefault(moment["video"], []).append(moment)
    names = list(by_video)
    bare = next(v for v in names if v.endswith("."))  # one of the 31 file names ending in a bare "."
    names = [bare] + [v for v in names if v != bare]
    ids = {"test": names[:n_test], "train": names[n_test: n_test + n_train],
           "val": names[n_test + n_train: n_test + n_train + n_val]}
    root.mkdir(parents=True, exist_ok=True)
    for split, chosen in ids.items():
        (root / f"{split}_data.json").write_text(json.dumps([m for v in chosen for m in by_video[v]]))
        (root / f"{split}_list.txt").write_text("\n".join(chosen) + "\n")
    for k, video_id in enumerate(ids["train"] + ids["val"] + ids["test"]):
        stem = video_id.rsplit(".", 1)[0]
        name = (video_id, f"{stem}.mp4", stem)[k % 3]
        write_clip(root / "videos" / name, _clip_length(k), width=36, height=44, seed=k)
    return ids


BUILDERS = {"msrvtt": build_msrvtt, "msvd": build_msvd, "vatex": build_vatex, "activitynet": build_activitynet,
            "didemo": build_didemo}


# ------------------------------------------------------------------------------------------------------ running
def tiny_args(dataset: str, root: Path, out: Path, method: str = "cross_modal_adapter", config: str | None = None):
    """The shipped configs of a dataset and a method on the synthetic tiny backbone, at test size."""
    return [
        "--config", str(REPO / "configs/trainer/cpu.yaml"),
        "--config", str(REPO / f"configs/data/{config or dataset}.yaml"),
        "--config", str(REPO / f"configs/model/{method}.yaml"),
        "--config", str(REPO / "configs/backbone/tiny_synthetic.yaml"),
        f"--data.root={root}", "--data.num_frames=4", "--data.batch_size=4", "--data.eval_batch_size=3",
        "--data.num_workers=0", "--trainer.max_steps=2", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}", f"--metrics.save_dir={out}",
    ]


def run_record(dataset: str, root: Path, out: Path, *extra: str, method: str = "cross_modal_adapter") -> dict:
    result = out / "record.json"
    assert main(["run", "--result", str(result), "--method", method, *tiny_args(dataset, root, out, method),
                 *extra]) == 0
    return json.loads(result.read_text())


def check_metrics(record: dict, videos: int, captions: int) -> None:
    metrics = record["metrics"]
    assert metrics["num_videos"] == videos and metrics["num_captions"] == captions
    for key in ("t2v/R@1", "t2v/R@5", "v2t/R@1"):
        assert 0.0 <= metrics[key] <= 100.0
    assert 1.0 <= metrics["t2v/MdR"] <= videos and 1.0 <= metrics["t2v/MnR"] <= videos
    assert record["efficiency"]["train_steps"] == 2


# ------------------------------------------------------------------------------------------------------ tests
def test_msrvtt_real_split_files_fit_and_test(tmp_path, synthetic_backbone):
    ids = build_msrvtt(tmp_path / "msrvtt")
    record = run_record("msrvtt", tmp_path / "msrvtt", tmp_path / "out", "--data.missing_videos=skip",
                        "--data.train_captions=random_one")
    check_metrics(record, videos=TEST, captions=TEST)
    data = record["data"]
    assert (data["train_split"], data["test_split"]) == ("train_9k", "test_1k")
    assert data["train_videos"] == TRAIN and data["train_captions"] == 2 * TRAIN
    # validation: the shipped config holds 500 of the 9,000 training videos out (never the 1k-A test set)
    assert data["val_split"] == "holdout" and data["val_holdout"]["ids"] == ids["held_out"]
    assert data["val_videos"] == VAL and not set(ids["held_out"]) & set(ids["test"])
    assert data["train_missing_videos"] == ids["listed_train"] - 500 - TRAIN == 8493
    assert record["checkpoint_selection"]["tested"] == "last"  # limit_val_batches=0: nothing validated
    assert data["test_missing_videos"] == ids["listed_test"] - TEST == 995
    assert len(data["test_missing_video_ids"]) == 995 and ids["test"][0] not in data["test_missing_video_ids"]
    assert data["train_caption_sampling"] == "random_one"  # one caption per video per epoch, logged
    assert (data["num_frames"], data["max_words"], data["frame_protocol"]) == (4, 32, "fps")  # the real configs sample as CLIP4Clip


def test_msvd_raw_captions_pickle_and_avi_videos_fit_and_test(tmp_path, synthetic_backbone):
    build_msvd(tmp_path / "msvd")
    record = run_record("msvd", tmp_path / "msvd", tmp_path / "out")
    # every test caption is a query: 3 captions for each of the 5 test videos
    check_metrics(record, videos=TEST, captions=3 * TEST)
    data = record["data"]
    assert (data["test_videos"], data["test_captions"], data["test_missing_videos"]) == (TEST, 3 * TEST, 0)
    assert data["train_captions"] == 3 * TRAIN and data["val_split"] == "val"


def test_vatex_official_json_with_a_missing_video_fit_and_test(tmp_path, synthetic_backbone):
    ids = build_vatex(tmp_path / "vatex")
    record = run_record("vatex", tmp_path / "vatex", tmp_path / "out")
    check_metrics(record, videos=TEST - 1, captions=10 * (TEST - 1))
    data = record["data"]
    assert data["test_listed_videos"] == TEST and data["test_missing_videos"] == 1
    assert data["test_missing_video_ids"] == ids["absent"]
    assert data["missing_videos"] == "skip"


def test_activitynet_paragraphs_either_file_naming_fit_and_test(tmp_path, synthetic_backbone):
    build_activitynet(tmp_path / "activitynet")
    # the shipped config holds 500 training videos out for validation; the tiny copy lists 7
    record = run_record("activitynet", tmp_path / "activitynet", tmp_path / "out", "--data.val_holdout=2")
    check_metrics(record, videos=TEST, captions=TEST)  # one paragraph per video
    assert (record["data"]["val_videos"], record["data"]["train_videos"]) == (2, TRAIN - 2)
    data = record["data"]
    assert (data["test_split"], data["max_words"], data["test_missing_videos"]) == ("val_1", 64, 0)


def test_didemo_odd_file_names_first_30_seconds_fit_and_test(tmp_path, synthetic_backbone):
    build_didemo(tmp_path / "didemo")
    record = run_record("didemo", tmp_path / "didemo", tmp_path / "out")
    check_metrics(record, videos=TEST, captions=TEST)
    data = record["data"]
    assert (data["max_seconds"], data["test_missing_videos"], data["max_words"]) == (30, 0, 64)
    assert data["dataset_options"] == {"use_list": True}


def test_fit_then_test_commands_on_msvd(tmp_path, synthetic_backbone):
    """The two LightningCLI commands, as a user types them: fit, then test (zero-shot needs no checkpoint)."""
    build_msvd(tmp_path / "msvd")
    out = tmp_path / "out"
    main(["fit", *tiny_args("msvd", tmp_path / "msvd", out)])
    main(["test", *tiny_args("msvd", tmp_path / "msvd", out, method="zero_shot")])
    saved = json.loads((out / "test_metrics.json").read_text())
    assert saved["num_videos"] == TEST and saved["num_captions"] == 3 * TEST


def test_shipped_configs_state_the_protocol():
    import yaml

    expected = {  # frames, words, per-GPU batch (x 8 GPUs = 128 / 64), train split, test split
        "msrvtt": (12, 32, 16, "train_9k", "test_1k"), "msrvtt_7k": (12, 32, 16, "train_7k", "test_1k"),
        "msvd": (12, 32, 16, "train", "test"), "vatex": (12, 32, 16, "train", "test"),
        "activitynet": (64, 64, 8, "train", "val_1"), "didemo": (64, 64, 8, "train", "test"),
    }
    for name, (frames, words, batch, train, test) in expected.items():
        path = REPO / f"configs/data/{name}.yaml"
        text = path.read_text()
        data = yaml.safe_load(text)["data"]
        got = (data["num_frames"], data["max_words"], data["batch_size"], data["train_split"], data["test_split"])
        assert got == (frames, words, batch, train, test), name
        assert 8 * batch in (128, 64) and f"global batch {8 * batch}" in text, name
        assert text.startswith("#") and data["root"].startswith("data/"), name
