"""`petl-bench prepare`: what it reports about a data folder, when it fails, and the frame cache it builds — which a
run then reads with the same results as decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from petl_bench.cli import main
from petl_bench.data.frame_cache import FrameCache
from tests.test_bad_input import truncate, zero_frame_mp4
from tests.test_datasets_e2e import TEST, TRAIN, VAL, build_didemo, build_msrvtt, build_vatex, tiny_args


def prepare(*args: str, report: Path) -> tuple[int, dict]:
    code = main(["prepare", *args, "--report", str(report), "--no-progress"])
    return code, json.loads(report.read_text())


def test_counts_listed_present_and_missing_videos_per_split(tmp_path, capsys):
    ids = build_vatex(tmp_path / "vatex", absent=2)
    code, report = prepare("vatex", "--root", str(tmp_path / "vatex"), report=tmp_path / "report.json")
    assert code == 0 and report["ok"] and report["errors"] == []
    splits = report["splits"]
    assert {s: (e["listed"], e["present"], e["missing"]) for s, e in splits.items()} == {
        "train": (TRAIN, TRAIN, 0), "val": (VAL, VAL, 0), "test": (TEST, TEST - 2, 2)}
    assert splits["test"]["missing_ids"] == ids["absent"] and splits["test"]["captions"] == 10 * TEST
    assert splits["test"]["present_captions"] == 10 * (TEST - 2)
    assert report["checked_decoding"] is False and "frame_cache" not in report
    err = capsys.readouterr().err
    assert "test: 2 listed videos missing" in err and ids["absent"][0] in err and "ok" in err


def test_the_real_msrvtt_lists_with_few_videos(tmp_path):
    build_msrvtt(tmp_path / "msrvtt")
    code, report = prepare("msrvtt", "--root", str(tmp_path / "msrvtt"), "--missing-videos", "skip",
                           report=tmp_path / "r.json")
    assert code == 0
    assert (report["splits"]["test_1k"]["listed"], report["splits"]["test_1k"]["present"]) == (1000, TEST)
    # prepare counts the whole 9k list: the training clips and the clips of the validation ids held out from it
    assert (report["splits"]["train_9k"]["listed"], report["splits"]["train_9k"]["present"]) == (9000, TRAIN + VAL)
    assert report["splits"]["train_7k"]["listed"] == 7010


def test_check_decode_lists_unreadable_files_and_fails(tmp_path, capsys):
    ids = build_vatex(tmp_path / "vatex", absent=0)
    videos = tmp_path / "vatex/videos"
    truncated = truncate(videos / f"{ids['test'][1]}.mp4")
    empty = zero_frame_mp4(videos / f"{ids['train'][0]}.mp4")
    page = videos / f"{ids['val'][2]}.mp4"
    page.write_text("<html>404</html>")
    code, report = prepare("vatex", "--root", str(tmp_path / "vatex"), report=tmp_path / "plain.json")
    assert code == 0 and report["splits"]["test"]["unreadable"] == []  # not checked without --check-decode
    code, report = prepare("vatex", "--root", str(tmp_path / "vatex"), "--check-decode", report=tmp_path / "r.json")
    assert code == 1 and not report["ok"] and report["unreadable"] == 3
    bad = {s: [(u["video_id"], u["path"]) for u in e["unreadable"]] for s, e in report["splits"].items()}
    assert bad == {"train": [(ids["train"][0], str(empty))], "val": [(ids["val"][2], str(page))],
                   "test": [(ids["test"][1], str(truncated))]}
    assert "no video" in report["splits"]["train"]["unreadable"][0]["reason"]
    assert "3 video file(s) cannot be decoded" in report["errors"][0]
    assert str(truncated) in capsys.readouterr().err


def test_a_missing_annotation_file_fails_only_for_splits_a_run_needs(tmp_path, capsys):
    build_didemo(tmp_path / "didemo")
    (tmp_path / "didemo/train_data.json").unlink()
    code, report = prepare("didemo", "--root", str(tmp_path / "didemo"), report=tmp_path / "r.json")
    assert code == 1 and "train" in report["unavailable_splits"]
    assert any("train_data.json" in error and "LocalizingMoments" in error for error in report["errors"])
    assert "train_data.json" in capsys.readouterr().err
    code, report = prepare("didemo", "--root", str(tmp_path / "didemo"), "--split", "test", "--split", "val",
                           report=tmp_path / "r.json")
    assert code == 0 and list(report["splits"]) == ["test", "val"]

    build_msrvtt(tmp_path / "msrvtt", n_train=1, n_test=1)
    (tmp_path / "msrvtt/MSRVTT_train.7k.csv").unlink()  # the optional 7k list: reported, not an error
    code, report = prepare("msrvtt", "--root", str(tmp_path / "msrvtt"), "--missing-videos", "skip",
                           report=tmp_path / "r.json")
    assert code == 0 and "MSRVTT_train.7k.csv" in report["unavailable_splits"]["train_7k"]


def test_the_verdict_follows_the_missing_videos_policy_of_the_dataset_config(tmp_path, capsys):
    # configs/data/msrvtt.yaml sets missing_videos: error, so a run stops on the first missing video: so does prepare
    build_msrvtt(tmp_path / "msrvtt")
    code, report = prepare("msrvtt", "--root", str(tmp_path / "msrvtt"), report=tmp_path / "r.json")
    assert code == 1 and report["missing_videos"] == "error" and not report["ok"]
    assert [e.split(":")[0] for e in report["errors"]] == ["train_9k", "test_1k"]  # the splits a run reads
    assert "995 listed videos are missing and a run with data.missing_videos=error" in report["errors"][1]
    err = capsys.readouterr().err
    assert "--data.missing_videos=skip" in err and "ok: a run can use this folder" not in err
    code, report = prepare("msrvtt", "--root", str(tmp_path / "msrvtt"), "--missing-videos", "skip",
                           report=tmp_path / "r.json")
    assert code == 0 and report["ok"] and report["missing_videos"] == "skip"
    assert "ok: a run can use this folder (missing videos are skipped and counted" in capsys.readouterr().err
    # a config whose policy is skip (VATEX: YouTube sources disappear) passes with missing videos, unless told error
    build_vatex(tmp_path / "vatex", absent=2)
    assert prepare("vatex", "--root", str(tmp_path / "vatex"), report=tmp_path / "v.json")[0] == 0
    code, report = prepare("vatex", "--root", str(tmp_path / "vatex"), "--missing-videos", "error",
                           report=tmp_path / "v.json")
    assert code == 1 and report["errors"][0].startswith("test: 2 listed videos are missing")


def test_options_and_bad_arguments(tmp_path, capsys):
    ids = build_vatex(tmp_path / "vatex")
    entries = json.loads((tmp_path / "vatex/vatex_training_v1.0.json").read_text())
    (tmp_path / "vatex/vatex_training_v1.0.json").write_text(json.dumps(entries[1:]))  # a train id without captions
    code, report = prepare("vatex", "--root", str(tmp_path / "vatex"), report=tmp_path / "r.json")
    assert code == 1 and "have no captions" in report["errors"][0]
    code, report = prepare("vatex", "--root", str(tmp_path / "vatex"), "--option", "missing=skip",
                           report=tmp_path / "r.json")
    assert code == 0 and report["splits"]["train"]["skipped_without_captions_ids"] == [ids["train"][0]]
    assert main(["prepare", "vatex", "--root", str(tmp_path / "vatex"), "--option", "speed=fast",
                 "--report", str(tmp_path / "x.json")]) == 1
    assert "vatex has no option 'speed'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "no_such_dataset", "--root", str(tmp_path)])
    assert exit_.value.code == 2
    code, report = prepare("vatex", "--root", str(tmp_path / "vatex"), "--video-root", str(tmp_path / "nowhere"),
                           "--option", "missing=skip", report=tmp_path / "r.json")
    assert code == 1 and "video folder" in report["errors"][0] and "nowhere" in report["errors"][0]
    (tmp_path / "empty").mkdir()
    code, report = prepare("vatex", "--root", str(tmp_path / "vatex"), "--video-root", str(tmp_path / "empty"),
                           "--option", "missing=skip", report=tmp_path / "r.json")
    assert code == 1 and f"train: none of the {TRAIN - 1} listed videos exist under" in report["errors"][0]


def test_frame_cache_is_built_once_reused_and_read_by_runs_with_identical_results(tmp_path, synthetic_backbone):
    build_vatex(tmp_path / "vatex", absent=1)
    cache_dir = tmp_path / "cache"
    args = ("vatex", "--root", str(tmp_path / "vatex"), "--frame-cache", str(cache_dir), "--image-size", "32",
            "--num-frames", "4")
    code, report = prepare(*args, report=tmp_path / "r.json")
    present = TRAIN + VAL + TEST - 1
    assert code == 0 and report["frame_cache"]["added"] == present and report["frame_cache"]["videos"] == present
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["dataset"] == "vatex" and manifest["image_size"] == 32
    assert manifest["sampling"] == {"num_frames": 4, "frames_per_segment": 2, "max_seconds": None}
    cache = FrameCache.open(cache_dir)
    assert len(cache) == present and len((cache_dir / "index.jsonl").read_text().splitlines()) == present
    entry = next(iter(cache.entries.values()))
    frames = np.load(cache.frames_path(entry))
    assert frames.dtype == np.uint8 and frames.shape == (len(entry.indices), 3, 32, 32)

    code, again = prepare(*args, report=tmp_path / "again.json")  # nothing to do the second time
    assert code == 0 and (again["frame_cache"]["added"], again["frame_cache"]["reused"]) == (0, present)
    code, other = prepare(*args[:-3], "48", report=tmp_path / "other.json")
    assert code == 1 and "holds 32x32 frames" in other["errors"][0]

    # a zero-shot test run reads the cache and scores exactly as one that decodes (the same evaluation frames)
    metrics = {}
    for name, extra in (("decoded", []), ("cached", [f"--data.frame_cache={cache_dir}"])):
        out = tmp_path / name
        main(["test", *tiny_args("vatex", tmp_path / "vatex", out, method="zero_shot"), *extra])
        metrics[name] = json.loads((out / "test_metrics.json").read_text())["metrics"]
    assert metrics["cached"] == metrics["decoded"] and metrics["cached"]["num_videos"] == TEST - 1


def test_frame_cache_defaults_come_from_the_dataset_config_and_a_torn_build_resumes(tmp_path):
    ids = build_didemo(tmp_path / "didemo")
    cache_dir = tmp_path / "cache"
    args = ("didemo", "--root", str(tmp_path / "didemo"), "--split", "test", "--frame-cache", str(cache_dir),
            "--image-size", "32")
    code, report = prepare(*args, report=tmp_path / "r.json")
    assert code == 0 and report["frame_cache"]["added"] == TEST
    assert report["frame_cache"]["sampling"] == {"num_frames": 64, "frames_per_segment": 2, "max_seconds": 30.0}
    index = cache_dir / "index.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])  # the last append was cut short
    assert len(FrameCache.open(cache_dir).entries) == TEST - 1
    code, report = prepare(*args, report=tmp_path / "r.json")
    assert code == 0 and (report["frame_cache"]["added"], report["frame_cache"]["reused"]) == (1, TEST - 1)
    assert set(FrameCache.open(cache_dir).entries) == set(ids["test"])


def test_frame_cache_auto_is_the_data_folders_own(tmp_path, caplog):
    """``prepare --frame-cache auto`` builds <root>/frame_cache, which ``data.frame_cache: auto`` then reads; a run at
    another frame size decodes, saying so."""
    from petl_bench.data.datamodule import RetrievalDataModule

    ids = build_didemo(tmp_path / "didemo")
    root = tmp_path / "didemo"
    dm = RetrievalDataModule("didemo", root=str(root), backbone="petl-tiny-vit", num_frames=4, num_workers=0,
                             max_seconds=30, frame_cache="auto")
    with caplog.at_level("WARNING"):
        assert dm.frame_cache_dir() is None
    assert "no frame cache at" in caplog.text and "--frame-cache auto --image-size 32" in caplog.text
    code, report = prepare("didemo", "--root", str(root), "--split", "test", "--frame-cache", "auto",
                           "--image-size", "32", report=tmp_path / "r.json")
    assert code == 0 and report["frame_cache"]["dir"] == str(root / "frame_cache")
    dm = RetrievalDataModule("didemo", root=str(root), backbone="petl-tiny-vit", num_frames=4, num_workers=0,
                             max_seconds=30, frame_cache="auto")
    assert dm.frame_cache_dir() == str(root / "frame_cache") and set(dm.frame_cache.entries) == set(ids["test"])
    other = RetrievalDataModule("didemo", root=str(root), backbone="petl-tiny-vit", image_size=48, num_frames=4,
                                num_workers=0, frame_cache="auto")
    assert other.frame_cache_dir() is None


@pytest.mark.slow  # starting the worker processes (spawn: each imports torch) takes 5-30 s on a busy 2-core machine
def test_frame_cache_with_worker_processes_matches_one_process(tmp_path):
    build_vatex(tmp_path / "vatex", n_train=2, n_val=1, n_test=3, absent=0)
    root = str(tmp_path / "vatex")
    prepare("vatex", "--root", root, "--frame-cache", str(tmp_path / "one"), "--image-size", "32",
            report=tmp_path / "one.json")
    code, report = prepare("vatex", "--root", root, "--frame-cache", str(tmp_path / "two"), "--image-size", "32",
                           "--workers", "2", "--check-decode", report=tmp_path / "two.json")
    assert code == 0 and report["frame_cache"]["added"] == 6 and report["unreadable"] == 0
    one, two = FrameCache.open(tmp_path / "one"), FrameCache.open(tmp_path / "two")
    assert one.entries.keys() == two.entries.keys()
    for video_id, entry in one.entries.items():
        assert entry == two.entries[video_id]
        assert np.array_equal(np.load(one.frames_path(entry)), np.load(two.frames_path(entry)))
