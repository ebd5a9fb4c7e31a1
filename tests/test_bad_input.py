"""Bad input as a run meets it: through the DataModule (and the `petl-bench` command where the message must reach the
user), each failing with a message that names the file, line, key or video and says what to do.

The loaders' own checks on every annotation format are in test_datasets.py; these tests show the same errors
surface unchanged from a run, and cover what only a run sees: missing videos under both policies, undecodable,
truncated and zero-frame videos met while loading batches, clips shorter than the frame count.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch

from petl_bench.cli import main
from petl_bench.data.datasets._common import AnnotationError, AnnotationFileNotFoundError
from petl_bench.data.video import VideoDecodeError
from tests.test_datamodule import SIMPLE, datamodule, msvd_folder
from tests.test_datasets_e2e import build_msrvtt, build_vatex, tiny_args, write_clip


def zero_frame_mp4(path: Path) -> Path:
    """A valid mp4 header with a video stream and no frames."""
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
        container.mux(stream.encode(None))
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ------------------------------------------------------------------------------------------------------ annotations
def test_a_missing_annotation_file_is_named_when_the_run_sets_up(tmp_path):
    root = msvd_folder(tmp_path, SIMPLE)
    (root / "test_list.txt").unlink()
    with pytest.raises(AnnotationFileNotFoundError, match=r"missing annotation file .*test_list\.txt.*msvd_data\.zip"):
        datamodule("msvd", root).setup("test")
    with pytest.raises(AnnotationFileNotFoundError, match=r"annotation folder .*elsewhere.* does not exist"):
        datamodule("msvd", root, annotation_root=str(tmp_path / "elsewhere")).setup("test")


def test_malformed_json_and_csv_name_the_line(tmp_path):
    build_vatex(tmp_path / "vatex")
    path = tmp_path / "vatex/vatex_training_v1.0.json"
    text = json.dumps(json.loads(path.read_text()), indent=1)
    path.write_text(text.replace('"enCap"', '"enCap" "oops"', 1))
    line = text[: text.index('"enCap"')].count("\n") + 1
    with pytest.raises(AnnotationError, match=rf"vatex_training_v1\.0\.json: malformed JSON at line {line}, column"):
        datamodule("vatex", tmp_path / "vatex").setup("test")

    build_msrvtt(tmp_path / "msrvtt", n_train=1, n_test=2)
    csv_path = tmp_path / "msrvtt/MSRVTT_JSFUSION_test.csv"
    rows = csv_path.read_text().splitlines()
    rows[3] = rows[3] + ",an extra field"
    csv_path.unlink()  # the real file is a read-only link: replace it with an edited copy
    csv_path.write_text("\n".join(rows) + "\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test\.csv: line 4: expected 4 fields .* found 5"):
        datamodule("msrvtt", tmp_path / "msrvtt").setup("test")


def test_empty_or_non_utf8_captions_are_refused_with_the_video(tmp_path):
    root = msvd_folder(tmp_path, SIMPLE)
    captions = json.loads((root / "captions_msvd.json").read_text())
    captions["f_11_12"][1] = " "
    (root / "captions_msvd.json").write_text(json.dumps(captions))
    with pytest.raises(AnnotationError, match=r"empty caption for video 'f_11_12' \(caption 1\)"):
        datamodule("msvd", root).setup("test")
    captions["f_11_12"][1] = "caf\u00e9"
    (root / "captions_msvd.json").write_bytes(json.dumps(captions, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"captions_msvd\.json: not valid UTF-8 \(byte 0xe9 at line 1"):
        datamodule("msvd", root).setup("test")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_caption_pickle_is_refused_without_running_its_code(tmp_path):
    root = msvd_folder(tmp_path, SIMPLE)
    marker = tmp_path / "pwned"
    (root / "raw-captions.pkl").write_bytes(pickle.dumps({"e_9_10": [["a", "b"]], "f_11_12": [_Payload(marker)]}))
    with pytest.raises(AnnotationError, match=r"raw-captions\.pkl: refused to load: the pickle asks for .*open"):
        datamodule("msvd", root).setup("test")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ videos
def test_a_missing_video_is_skipped_and_counted_or_named_in_the_error(tmp_path, caplog):
    root = msvd_folder(tmp_path, SIMPLE)
    (root / "videos/f_11_12.mp4").unlink()
    with caplog.at_level(logging.WARNING):
        skip = datamodule("msvd", root)
        skip.setup("test")
    assert "msvd/test: 1 of 2 listed videos are missing" in caplog.text and "f_11_12" in caplog.text
    summary = skip.summary()
    assert (summary["test_videos"], summary["test_captions"], summary["test_listed_videos"]) == (1, 1, 2)
    assert summary["test_missing_videos"] == 1 and summary["test_missing_video_ids"] == ["f_11_12"]
    with pytest.raises(FileNotFoundError, match=r"1 of 2 listed videos are missing under .*videos \(f_11_12\); "
                                                r"download them, or set data.missing_videos=skip"):
        datamodule("msvd", root, missing_videos="error").setup("test")
    for name in ("e_9_10", "a_1_2", "b_3_4", "c_5_6"):
        (root / f"videos/{name}.mp4").unlink()
    with pytest.raises(FileNotFoundError, match=r"none of the 2 listed videos exist under"):
        datamodule("msvd", root).setup("test")
    with pytest.raises(FileNotFoundError, match=r"video folder .*nowhere does not exist; set data.video_root"):
        datamodule("msvd", root, video_root=str(tmp_path / "nowhere")).setup("test")


def test_a_missing_video_under_the_error_policy_stops_the_command(tmp_path):
    ids = build_vatex(tmp_path / "vatex")
    with pytest.raises(FileNotFoundError, match=rf"vatex/test: 1 of 5 listed videos are missing .*{ids['absent'][0]}"):
        main(["test", *tiny_args("vatex", tmp_path / "vatex", tmp_path / "out", method="zero_shot"),
              "--data.missing_videos=error"])


@pytest.mark.parametrize("damage", ["truncated", "zero_frames", "not_a_video"])
def test_an_undecodable_video_met_during_a_run_names_the_file_and_prepare(tmp_path, damage):
    root = msvd_folder(tmp_path, SIMPLE)
    bad = root / "videos/f_11_12.mp4"
    if damage == "truncated":
        truncate(write_clip(bad, 16))
    elif damage == "zero_frames":
        zero_frame_mp4(bad)
    else:
        bad.write_text("<html>This video is no longer available</html>\n" * 10)
    reason = {"truncated": "not a readable video", "zero_frames": "no video", "not_a_video": "not a readable video"}
    dm = datamodule("msvd", root)
    dm.setup("test")  # the file exists: the problem shows when frames are read
    videos = dm.test_dataloader()[0]
    with pytest.raises(VideoDecodeError) as err:
        list(videos)
    message = str(err.value)
    assert f"cannot decode video {bad}" in message and reason[damage] in message
    assert "video 'f_11_12' of msvd/test" in message and "petl-bench prepare msvd --root" in message


def test_a_decode_error_in_a_loader_worker_keeps_its_message(tmp_path):
    root = msvd_folder(tmp_path, SIMPLE)
    zero_frame_mp4(root / "videos/f_11_12.mp4")
    dm = datamodule("msvd", root, num_workers=1)
    batches = iter(dm.test_dataloader()[0])
    try:
        with pytest.raises(VideoDecodeError, match=r"(?s)f_11_12\.mp4: it has no video.*petl-bench prepare msvd"):
            list(batches)
    finally:
        batches._shutdown_workers()  # now, not at a later garbage collection (which waits seconds for the worker)


def test_an_undecodable_test_video_stops_the_command_with_the_file_named(tmp_path):
    ids = build_vatex(tmp_path / "vatex")
    bad = truncate(tmp_path / "vatex/videos" / f"{ids['test'][0]}.mp4")
    with pytest.raises(VideoDecodeError, match=rf"(?s)cannot decode video {bad}.*petl-bench prepare vatex"):
        main(["test", *tiny_args("vatex", tmp_path / "vatex", tmp_path / "out", method="zero_shot")])


def test_a_clip_shorter_than_the_frame_count_is_padded_and_masked(tmp_path):
    root = msvd_folder(tmp_path, SIMPLE, frames={"e_9_10": 2, "f_11_12": 1, "a_1_2": 3})
    dm = datamodule("msvd", root, num_frames=5)
    batch = next(iter(dm.test_dataloader()[0]))
    assert batch["video_mask"].tolist() == [[True, True, False, False, False], [True, False, False, False, False]]
    assert not batch["video"][0, 2:].any() and not batch["video"][1, 1:].any()
    assert batch["video"][0, :2].float().mean() > 0 and batch["video"][1, 0].float().mean() > 0
    train = dm.train_dataloader().dataset
    item = train[0]  # the 3-frame training clip
    assert item["video_mask"].sum() == 3 and not item["video"][3:].any()
    assert isinstance(item["video"], torch.Tensor) and item["video"].dtype == torch.uint8


# ------------------------------------------------------------------------------------------------ sizes and counts
@pytest.mark.parametrize(("key", "value", "message"), [
    ("num_frames", -3, "data.num_frames=-3: frames sampled per video must be a whole number >= 1"),
    ("num_frames", 0, "data.num_frames=0: frames sampled per video must be a whole number >= 1"),
    ("max_words", 0, "data.max_words=0: tokens per caption must be a whole number >= 3"),
    ("max_words", -2, "data.max_words=-2: tokens per caption"),
    ("batch_size", 0, "data.batch_size=0: .* must be a whole number >= 1"),
    ("batch_size", -4, "data.batch_size=-4"),
    ("eval_batch_size", 0, "data.eval_batch_size=0: must be a whole number >= 1, or null to evaluate with data"),
])
def test_impossible_frame_token_and_batch_counts_stop_before_any_work(tmp_path, key, value, message):
    # before: num_frames<1 blamed the video ("re-download it") or, for a temporal method, failed building the model
    # with "negative dimension" inside a parser error; max_words=0 ran at 77 tokens; eval_batch_size=0 fell back
    root = msvd_folder(tmp_path, SIMPLE)
    with pytest.raises(ValueError, match=message):
        datamodule("msvd", root, **{key: value})
    # the command refuses it before building anything: MV-Adapter sizes its temporal modules from num_frames
    with pytest.raises(ValueError, match=message):
        main(["test", *tiny_args("msvd", root, tmp_path / "out", method="mv_adapter"), f"--data.{key}={value}"])
    assert not (tmp_path / "out").exists()


def test_the_smallest_usable_counts_are_accepted(tmp_path):
    root = msvd_folder(tmp_path, SIMPLE)
    dm = datamodule("msvd", root, num_frames=1, max_words=3, batch_size=1, eval_batch_size=None)
    assert dm.tokenize("a cat").shape == (3,)  # exactly max_words tokens, not open_clip's default 77
    dm.setup("test")
    assert dm.test_dataloader()[0].batch_size == 1  # null eval_batch_size: batch_size


def test_throughput_counts_the_samples_a_step_really_trains_on(tmp_path, synthetic_backbone, monkeypatch):
    # 7 training videos x 3 captions = 21 pairs with batch_size 64: the record counted 2 steps x 64 nominal samples
    # (3x too many); it must count the pairs the loader really handed to the model
    from petl_bench.data.datamodule import PairDataset
    from tests.test_datasets_e2e import build_msvd, run_record

    loaded = []
    original = PairDataset.__getitem__
    monkeypatch.setattr(PairDataset, "__getitem__", lambda self, i: loaded.append(i) or original(self, i))
    build_msvd(tmp_path / "msvd")
    record = run_record("msvd", tmp_path / "msvd", tmp_path / "out", "--data.batch_size=64")
    efficiency = record["efficiency"]
    assert efficiency["train_steps"] == 2 and len(loaded) <= 2 * 64
    # one process, a set smaller than a batch: one short batch per epoch, no pair repeated inside a contrastive batch
    assert len(loaded) == 2 * 21 and len(set(loaded[:21])) == 21
    assert efficiency["train_samples"] == len(loaded)  # num_workers=0: every item is loaded in this process
    assert efficiency["train_samples_per_second"] == pytest.approx(len(loaded) / efficiency["train_seconds"],
                                                                   rel=0.02)
