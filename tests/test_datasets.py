"""The five benchmark loaders on the real annotation files, plus every kind of bad input they must refuse clearly.

The real files live in the project's shared/annotations folder (see its PROVENANCE.md). Files too large to ship there
(MSRVTT_data.json, raw-captions.pkl, the VATEX caption JSON) are written by the tests in their real formats, keyed by
the real ids.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest

from petl_bench.data import dataset_names, get_dataset, load_annotations
from petl_bench.data.datasets._common import (
    AnnotationError,
    AnnotationFileNotFoundError,
    SkippedItemsWarning,
    check_videos,
    load_plain_pickle,
)

ANNOTATIONS = Path(__file__).parents[1].parent / "shared" / "annotations"


def real(dataset: str) -> Path:
    folder = ANNOTATIONS / dataset
    if not folder.is_dir():
        pytest.skip(f"real {dataset} annotations not found at {folder} (the project's shared/annotations folder)")
    return folder


def link(files: list[Path], folder: Path) -> Path:
    """A fresh annotation folder holding (links to) some real files, so a test can add or leave out the others."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        (folder / path.name).symlink_to(path)
    return folder


def list_ids(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def csv_column(path: Path, column: str) -> list[str]:
    with path.open(newline="") as file:
        return [row[column] for row in csv.DictReader(file)]


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


# ---------------------------------------------------------------------------------------------------------------------
# Registry


def test_all_five_registered_with_their_protocol():
    assert {"msrvtt", "msvd", "vatex", "activitynet", "didemo"} <= set(dataset_names())
    expected = {
        "msrvtt": (("train_9k", "train_7k", "test_1k"), "train_9k", "test_1k", False),
        "msvd": (("train", "val", "test"), "train", "test", False),
        "vatex": (("train", "val", "test"), "train", "test", False),
        "activitynet": (("train", "val_1"), "train", "val_1", True),
        "didemo": (("train", "val", "test"), "train", "test", True),
    }
    for name, (splits, train, test, paragraph) in expected.items():
        spec = get_dataset(name)
        assert (spec.splits, spec.train_split, spec.test_split, spec.paragraph) == (splits, train, test, paragraph)
        assert spec.v2t_protocol == "group"
        assert spec.val_split is None or spec.val_split in spec.splits


# ---------------------------------------------------------------------------------------------------------------------
# MSR-VTT


def test_msrvtt_1k_a_test_is_1000_videos_with_one_caption():
    folder = real("msrvtt")
    items = load_annotations("msrvtt", "test_1k", folder)
    assert len(items) == 1000
    assert all(len(captions) == 1 for _, captions in items)
    assert len({video_id for video_id, _ in items}) == 1000
    assert [video_id for video_id, _ in items] == csv_column(folder / "MSRVTT_JSFUSION_test.csv", "video_id")
    assert items[0] == ("video9770", ["a person is connecting something to system"])


@pytest.fixture(scope="module")
def msrvtt_with_captions(tmp_path_factory) -> Path:
    """Real split files plus a MSRVTT_data.json of the real format: two captions per video, interleaved the way the
    real file is not grouped by video."""
    source = real("msrvtt")
    folder = link(sorted(source.glob("*.csv")), tmp_path_factory.mktemp("msrvtt"))
    ids = sorted(
        {
            *csv_column(source / "MSRVTT_train.9k.csv", "video_id"),
            *csv_column(source / "MSRVTT_train.7k.csv", "video_id"),
        }
    )
    sentences = [
        {"caption": f"{video_id} caption {k}", "video_id": video_id, "sen_id": k * len(ids) + i}
        for k in range(2)
        for i, video_id in enumerate(ids)
    ]
    videos = [{"video_id": video_id, "url": "", "id": i} for i, video_id in enumerate(ids)]
    (folder / "MSRVTT_data.json").write_text(json.dumps({"sentences": sentences, "videos": videos}))
    return folder


@pytest.mark.parametrize(
    "split, count, csv_name", [("train_9k", 9000, "MSRVTT_train.9k.csv"), ("train_7k", 7010, "MSRVTT_train.7k.csv")]
)
def test_msrvtt_train_splits_take_captions_from_data_json(msrvtt_with_captions, split, count, csv_name):
    items = load_annotations("msrvtt", split, msrvtt_with_captions, train_captions="random_one")
    assert len(items) == count
    assert [video_id for video_id, _ in items] == csv_column(msrvtt_with_captions / csv_name, "video_id")
    video_id, captions = items[-1]
    assert captions == [f"{video_id} caption 0", f"{video_id} caption 1"]


def test_msrvtt_train_without_data_json_says_which_file_and_where_to_get_it(tmp_path):
    folder = link([real("msrvtt") / "MSRVTT_train.9k.csv"], tmp_path / "ann")
    with pytest.raises(AnnotationFileNotFoundError, match=r"MSRVTT_data\.json.*holds video ids only.*msrvtt_data\.zip"):
        load_annotations("msrvtt", "train_9k", folder)


def test_msrvtt_rejects_an_unknown_train_caption_mode():
    with pytest.raises(ValueError, match="train_captions='every'.*all, random_one"):
        load_annotations("msrvtt", "test_1k", real("msrvtt"), train_captions="every")


def test_msrvtt_find_video_and_check_videos(tmp_path):
    spec = get_dataset("msrvtt")
    items = load_annotations("msrvtt", "test_1k", real("msrvtt"))
    videos = tmp_path / "videos"
    touch(videos, f"{items[0][0]}.mp4", f"{items[1][0]}.mp4", f"{items[2][0]}.mkv")
    assert spec.find_video(videos, items[0][0]) == videos / f"{items[0][0]}.mp4"
    assert spec.find_video(videos, items[2][0]) == videos / f"{items[2][0]}.mkv"
    assert spec.find_video(videos, items[3][0]) is None
    report = check_videos(spec, items, videos)
    assert list(report.present) == [video_id for video_id, _ in items[:3]]
    assert len(report.missing) == 997 and report.missing[0] == items[3][0]
    assert "3 of 1,000" in report.summary() and "997 missing" in report.summary()
    assert report.to_dict()["present"] == 3
    with pytest.raises(FileNotFoundError, match="video folder"):
        check_videos(spec, items, tmp_path / "no-such-folder")


# ---------------------------------------------------------------------------------------------------------------------
# MSVD


@pytest.mark.parametrize("split, videos, captions", [("train", 1200, 48774), ("val", 100, 4290), ("test", 670, 27763)])
def test_msvd_splits_from_captions_json(split, videos, captions):
    folder = real("msvd")
    items = load_annotations("msvd", split, folder)
    assert len(items) == videos
    assert sum(len(c) for _, c in items) == captions
    assert [video_id for video_id, _ in items] == list_ids(folder / f"{split}_list.txt")


def test_msvd_prefers_raw_captions_pickle_and_says_so(tmp_path, caplog):
    source = real("msvd")
    folder = link(sorted(source.glob("*")), tmp_path / "ann")
    reference = json.loads((source / "captions_msvd.json").read_text())
    # raw-captions.pkl format: video id -> list of token lists.
    tokens = {video_id: [caption.split() for caption in captions] for video_id, captions in reference.items()}
    (folder / "raw-captions.pkl").write_bytes(pickle.dumps(tokens))
    with caplog.at_level("INFO", logger="petl_bench.data.datasets.msvd"):
        items = load_annotations("msvd", "test", folder)
    assert "raw-captions.pkl" in caplog.text
    assert len(items) == 670 and sum(len(c) for _, c in items) == 27763
    video_id, captions = items[0]
    assert captions == [" ".join(caption.split()) for caption in reference[video_id]]
    caplog.clear()
    with caplog.at_level("INFO", logger="petl_bench.data.datasets.msvd"):
        load_annotations("msvd", "test", folder, captions_file="captions_msvd.json")
    assert "captions_msvd.json" in caplog.text


def test_msvd_listed_video_without_captions_fails_or_is_skipped(tmp_path):
    (tmp_path / "test_list.txt").write_text("a_1_2\nb_3_4\n")
    (tmp_path / "captions_msvd.json").write_text(json.dumps({"a_1_2": ["a man cooks"]}))
    with pytest.raises(AnnotationError, match=r"1 of 2 videos listed in .*test_list\.txt have no captions.*'b_3_4'"):
        load_annotations("msvd", "test", tmp_path)
    with pytest.warns(SkippedItemsWarning, match="1 of 2"):
        assert load_annotations("msvd", "test", tmp_path, missing="skip") == [("a_1_2", ["a man cooks"])]


def test_msvd_find_video_accepts_avi_then_mp4(tmp_path):
    find = get_dataset("msvd").find_video
    touch(tmp_path, "a_1_2.avi", "b_3_4.mp4", "c_5_6.avi", "c_5_6.mp4")
    assert find(tmp_path, "a_1_2") == tmp_path / "a_1_2.avi"
    assert find(tmp_path, "b_3_4") == tmp_path / "b_3_4.mp4"
    assert find(tmp_path, "c_5_6") == tmp_path / "c_5_6.avi"
    assert find(tmp_path, "d_7_8") is None


# ---------------------------------------------------------------------------------------------------------------------
# VATEX


@pytest.fixture(scope="module")
def vatex_ids() -> dict[str, list[str]]:
    folder = real("vatex")
    return {split: list_ids(folder / f"{split}_list.txt") for split in ("train", "val", "test")}


def vatex_captions(video_id: str) -> list[str]:
    return [f"caption {k} of {video_id}" for k in range(2)]


def write_vatex_captions(folder: Path, ids: dict[str, list[str]], form: str, drop: set[str] = frozenset()) -> None:
    """Caption files in one of the three circulating formats for every listed id (except `drop`)."""

    def keep(split):
        return [video_id for video_id in ids[split] if video_id not in drop]

    if form == "official":  # HGR's val and test both come from the official validation file
        for name, splits in (("vatex_training_v1.0.json", ("train",)), ("vatex_validation_v1.0.json", ("val", "test"))):
            entries = [
                {"videoID": video_id, "enCap": vatex_captions(video_id), "chCap": ["一个人"] * 2}
                for split in splits
                for video_id in keep(split)
            ]
            (folder / name).write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    elif form == "vatex_data":
        data = {video_id: {"enCap": vatex_captions(video_id)} for split in ids for video_id in keep(split)}
        (folder / "vatex_data.json").write_text(json.dumps(data))
    else:
        data = {video_id: vatex_captions(video_id) for split in ids for video_id in keep(split)}
        (folder / "ref_captions.json").write_text(json.dumps(data))


@pytest.mark.parametrize("form", ["official", "vatex_data", "ref_captions"])
def test_vatex_hgr_lists_with_each_caption_format(tmp_path, vatex_ids, form):
    folder = link(sorted(real("vatex").glob("*_list.txt")), tmp_path / "ann")
    write_vatex_captions(folder, vatex_ids, form)
    for split, count in (("train", 25991), ("val", 1500), ("test", 1500)):
        items = load_annotations("vatex", split, folder)
        assert len(items) == count
        assert [video_id for video_id, _ in items] == vatex_ids[split]
        assert items[7][1] == vatex_captions(items[7][0])


def test_vatex_listed_ids_without_captions_fail_or_are_skipped_and_counted(tmp_path, vatex_ids):
    folder = link(sorted(real("vatex").glob("*_list.txt")), tmp_path / "ann")
    dropped = set(vatex_ids["test"][10:13])
    write_vatex_captions(folder, vatex_ids, "ref_captions", drop=dropped)
    with pytest.raises(
        AnnotationError, match=r"3 of 1500 videos listed in .*test_list\.txt have no captions.*missing='skip'"
    ):
        load_annotations("vatex", "test", folder)
    with pytest.warns(SkippedItemsWarning, match="3 of 1500") as record:
        items = load_annotations("vatex", "test", folder, missing="skip")
    assert len(items) == 1497 and not dropped & {video_id for video_id, _ in items}
    warning = next(w.message for w in record if isinstance(w.message, SkippedItemsWarning))
    assert (warning.dataset, warning.split, set(warning.skipped)) == ("vatex", "test", dropped)
    with pytest.raises(ValueError, match="missing='ignore'"):
        load_annotations("vatex", "test", folder, missing="ignore")


def test_vatex_find_video_accepts_other_containers(tmp_path):
    find = get_dataset("vatex").find_video
    touch(tmp_path, "abc_000001_000011.mp4", "def_000002_000012.webm")
    assert find(tmp_path, "abc_000001_000011") == tmp_path / "abc_000001_000011.mp4"
    assert find(tmp_path, "def_000002_000012") == tmp_path / "def_000002_000012.webm"
    assert find(tmp_path, "ghi_000003_000013") is None


# ---------------------------------------------------------------------------------------------------------------------
# ActivityNet Captions


@pytest.mark.parametrize(
    "split, ids_file, count", [("val_1", "val_ids.json", 4917), ("train", "train_ids.json", 10009)]
)
def test_activitynet_paragraphs_in_id_list_order(split, ids_file, count):
    folder = real("activitynet")
    items = load_annotations("activitynet", split, folder)
    assert len(items) == count
    assert all(len(captions) == 1 for _, captions in items)
    raw = json.loads((folder / f"{split}.json").read_text())
    listed = [video_id for video_id in json.loads((folder / ids_file).read_text()) if video_id in raw]
    assert [video_id for video_id, _ in items] == listed
    video_id, [paragraph] = items[0]
    assert paragraph == " ".join(sentence.strip() for sentence in raw[video_id]["sentences"])
    assert sum(len(raw[video_id]["sentences"]) for video_id, _ in items) == {"val_1": 17505, "train": 37421}[split]


def test_activitynet_without_id_list_keeps_caption_file_order(tmp_path):
    source = real("activitynet")
    folder = link([source / "val_1.json"], tmp_path / "ann")
    items = load_annotations("activitynet", "val_1", folder)
    assert [video_id for video_id, _ in items] == list(json.loads((source / "val_1.json").read_text()))


def test_activitynet_find_video_with_or_without_v_prefix(tmp_path):
    find = get_dataset("activitynet").find_video
    touch(tmp_path, "v_aaaaaaaaaaa.mp4", "bbbbbbbbbbb.mp4", "ccccccccccc.webm", "v_ddddddddddd.mkv")
    assert find(tmp_path, "v_aaaaaaaaaaa") == tmp_path / "v_aaaaaaaaaaa.mp4"
    assert find(tmp_path, "v_bbbbbbbbbbb") == tmp_path / "bbbbbbbbbbb.mp4"
    assert find(tmp_path, "v_ccccccccccc") == tmp_path / "ccccccccccc.webm"
    assert find(tmp_path, "ddddddddddd") == tmp_path / "v_ddddddddddd.mkv"
    assert find(tmp_path, "v_eeeeeeeeeee") is None


# ---------------------------------------------------------------------------------------------------------------------
# DiDeMo

# The 33 videos of test_data.json that collaborative-experts' test_list.txt (1,004 videos, sorted) leaves out, from
# albanie/collaborative-experts misc/datasets/didemo/test_list.txt at commit 31cf2d26d2b7b078bc329ff492f780fdc8714262.
# The list the tests write is every other test video, sorted: exactly that file.
CE_EXCLUDED_TEST_VIDEOS = {
    "18587146@N00_6146472848_ca77910fe4.mp4",
    "51727341@N00_4913494887_25ba94c153.mov",
    "14284621@N06_6920266298_17a95070f6.mov",
    "11699242@N07_8283285682_d1267bb1cc.",
    "8185633@N07_5262220923_f5557abe49.mp4",
    "33439178@N00_10927750385_a62098f6db.mts",
    "51035693821@N01_4474067925_24231c5cf4.mp4",
    "33439178@N00_12719506944_139e338f74.mts",
    "47887101@N00_5266279349_a057e6d6a1.mov",
    "41086995@N00_7450279020_06f7701526.mov",
    "39457011@N00_5403825464_79c0f43b72.mp4",
    "14284621@N06_7326435816_6960ca36bb.",
    "87913776@N00_7088250273_963b2fe940.mp4",
    "36888274@N00_5536769782_27b2dbf150.mov",
    "34971257@N00_9811029593_a376b930b0.mp4",
    "65441360@N00_6217916282_06a6b3c775.mov",
    "33439178@N00_10776479425_ff8212eb92.mp4",
    "7390466@N06_5596610883_8988733d1e.mp4",
    "11699242@N07_12627617794_e00f0196ee.mp4",
    "34971257@N00_7908108710_7b7dc7bde2.mov",
    "39548123@N06_5875211366_f7f5ba4b2f.mp4",
    "58792004@N06_8704171363_6b2bf5cc94.mp4",
    "39457011@N00_5467071969_a16873f4d4.mp4",
    "14284621@N06_6855148077_26c0c80d0a.mov",
    "53301297@N00_8730844638_1ca82efd9d.mp4",
    "34971257@N00_9113209964_0509e46f5d.mov",
    "58792004@N06_8543431675_8d0f71c4c3.",
    "33439178@N00_9022798576_af4fa83486.",
    "58792004@N06_9308598808_a4b0fb4742.mov",
    "58792004@N06_8543401937_e873e671f2.mov",
    "36888274@N00_6468865689_33a10a8d7e.mov",
    "41086995@N00_6089326931_7377668cb0.mp4",
    "58792004@N06_8977946361_0b26f4930d.mp4",
}


def test_didemo_test_data_is_1037_paragraphs_in_first_moment_order():
    folder = real("didemo")
    moments = json.loads((folder / "test_data.json").read_text())
    items = load_annotations("didemo", "test", folder)
    assert len(items) == 1037
    first_seen = list(dict.fromkeys(moment["video"] for moment in moments))
    assert [video_id for video_id, _ in items] == first_seen
    video_id, [paragraph] = items[0]
    assert paragraph == " ".join(m["description"].strip() for m in moments if m["video"] == video_id)


def test_didemo_collaborative_experts_test_list_gives_1004_videos(tmp_path):
    source = real("didemo")
    folder = link([source / "test_data.json"], tmp_path / "ann")
    moments = json.loads((source / "test_data.json").read_text())
    all_videos = {moment["video"] for moment in moments}
    assert CE_EXCLUDED_TEST_VIDEOS <= all_videos
    ce_list = sorted(all_videos - CE_EXCLUDED_TEST_VIDEOS)
    (folder / "test_list.txt").write_text("\n".join(ce_list) + "\n")
    items = load_annotations("didemo", "test", folder)
    assert len(items) == 1004
    assert [video_id for video_id, _ in items] == ce_list
    assert sum(1 for moment in moments if moment["video"] in set(ce_list)) == 3932
    assert len(load_annotations("didemo", "test", folder, use_list=False)) == 1037


def test_didemo_list_naming_a_video_without_moments_fails(tmp_path):
    folder = link([real("didemo") / "test_data.json"], tmp_path / "ann")
    (folder / "test_list.txt").write_text("nobody@N00_1_abc.mov\n")
    with pytest.raises(
        AnnotationError, match=r"test_list\.txt: 1 listed videos have no moments.*'nobody@N00_1_abc\.mov'"
    ):
        load_annotations("didemo", "test", folder)


def test_didemo_find_video_matches_the_stem_with_any_extension_or_none(tmp_path):
    find = get_dataset("didemo").find_video
    touch(tmp_path, "a@N00_1_x.mov", "b@N00_2_y.mp4", "c@N00_3_z", "d@N00_4_w.", "e@N00_5_v.m4v.mp4", "f@N00_6_u.json")
    assert find(tmp_path, "a@N00_1_x.mov") == tmp_path / "a@N00_1_x.mov"  # original name
    assert find(tmp_path, "b@N00_2_y.avi") == tmp_path / "b@N00_2_y.mp4"  # re-encoded
    assert find(tmp_path, "c@N00_3_z.wmv") == tmp_path / "c@N00_3_z"  # extension dropped
    assert find(tmp_path, "d@N00_4_w.") == tmp_path / "d@N00_4_w."  # original without extension
    assert find(tmp_path, "c@N00_3_z.") == tmp_path / "c@N00_3_z"
    assert find(tmp_path, "e@N00_5_v.m4v") == tmp_path / "e@N00_5_v.m4v.mp4"  # extension appended
    assert find(tmp_path, "f@N00_6_u.mov") is None  # an annotation file is not a video
    assert find(tmp_path / "missing", "a@N00_1_x.mov") is None
    touch(tmp_path, "g@N00_7_t.mp4")  # the per-folder index notices new files
    assert find(tmp_path, "g@N00_7_t.avi") == tmp_path / "g@N00_7_t.mp4"


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_annotation_folder_and_files_are_named(tmp_path):
    with pytest.raises(AnnotationFileNotFoundError, match="annotation folder .*nowhere.* does not exist"):
        load_annotations("msvd", "test", tmp_path / "nowhere")
    folder = link([real("msvd") / "captions_msvd.json"], tmp_path / "msvd")
    with pytest.raises(AnnotationFileNotFoundError, match=r"test_list\.txt.*msvd_data\.zip"):
        load_annotations("msvd", "test", folder)
    (folder / "test_list.txt").write_text("abc_1_2\n")
    (folder / "captions_msvd.json").unlink()
    with pytest.raises(AnnotationFileNotFoundError, match=r"raw-captions\.pkl or captions_msvd\.json"):
        load_annotations("msvd", "test", folder)
    with pytest.raises(AnnotationFileNotFoundError, match=r"val_1\.json"):
        load_annotations("activitynet", "val_1", tmp_path)
    with pytest.raises(AnnotationFileNotFoundError, match=r"train_data\.json.*LocalizingMoments"):
        load_annotations("didemo", "train", tmp_path)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="no split 'train'.*train_9k"):
        load_annotations("msrvtt", "train", ANNOTATIONS / "msrvtt")


def test_malformed_json_names_the_line_and_column(tmp_path):
    # A comma missing at the end of line 2: the parser stops at the first key of line 3.
    (tmp_path / "val_1.json").write_text('{\n  "v_a": {"sentences": ["one."]}\n  "v_b": {"sentences": ["two."]}\n}\n')
    with pytest.raises(AnnotationError, match=r"val_1\.json: malformed JSON at line 3, column 3: Expecting ','"):
        load_annotations("activitynet", "val_1", tmp_path)


def test_json_of_the_wrong_structure_names_the_key(tmp_path):
    (tmp_path / "test_data.json").write_text(json.dumps([{"video": "a.mov", "description": "x"}, {"video": "b.mov"}]))
    with pytest.raises(AnnotationError, match=r'test_data\.json: moment 1 has no "description" key'):
        load_annotations("didemo", "test", tmp_path)
    (tmp_path / "train.json").write_text(json.dumps({"v_a": {"sentences": "not a list"}}))
    with pytest.raises(AnnotationError, match=r"train\.json: \"sentences\" of 'v_a' is a str; expected a list"):
        load_annotations("activitynet", "train", tmp_path)


def test_malformed_csv_names_the_line(tmp_path):
    rows = ["key,vid_key,video_id,sentence", "ret0,msr0,video0,a dog runs", "ret1,msr1,video1,a cat, sitting", ""]
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows))
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test\.csv: line 3: expected 4 fields .* found 5"):
        load_annotations("msrvtt", "test_1k", tmp_path)
    rows[2] = 'ret1,msr1,video1,"a cat sitting'
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows))
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test\.csv: line \d+: malformed CSV"):
        load_annotations("msrvtt", "test_1k", tmp_path)
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("key,video,sentence\nret0,video0,a dog\n")
    with pytest.raises(AnnotationError, match=r"line 1: the header .* lacks column\(s\) video_id"):
        load_annotations("msrvtt", "test_1k", tmp_path)


def test_duplicate_id_in_a_split_list_names_both_lines(tmp_path):
    (tmp_path / "test_list.txt").write_text("a_1_2\nb_3_4\n\na_1_2\n")
    (tmp_path / "captions_msvd.json").write_text(json.dumps({"a_1_2": ["x"], "b_3_4": ["y"]}))
    with pytest.raises(
        AnnotationError, match=r"test_list\.txt: line 4: video id 'a_1_2' is listed twice \(first on line 1\)"
    ):
        load_annotations("msvd", "test", tmp_path)


def test_empty_caption_names_the_video(tmp_path):
    (tmp_path / "test_list.txt").write_text("a_1_2\nb_3_4\n")
    (tmp_path / "captions_msvd.json").write_text(json.dumps({"a_1_2": ["a man cooks"], "b_3_4": ["a dog", "   "]}))
    with pytest.raises(AnnotationError, match=r"empty caption for video 'b_3_4' \(caption 1\)"):
        load_annotations("msvd", "test", tmp_path)
    (tmp_path / "test_data.json").write_text(
        json.dumps(
            [
                {"video": "a.mov", "description": "ok", "annotation_id": 7},
                {"video": "b.mov", "description": "", "annotation_id": 9},
            ]
        )
    )
    with pytest.raises(AnnotationError, match=r"empty caption for video 'b\.mov' \(moment 1, annotation_id 9\)"):
        load_annotations("didemo", "test", tmp_path)
    (tmp_path / "val_1.json").write_text(json.dumps({"v_a": {"sentences": ["fine.", None]}}))
    with pytest.raises(AnnotationError, match=r"caption of video 'v_a' \(sentence 1\) is a NoneType"):
        load_annotations("activitynet", "val_1", tmp_path)


def test_non_utf8_caption_file_names_the_line(tmp_path):
    (tmp_path / "test_list.txt").write_text("a_1_2\n")
    text = '{\n"a_1_2": ["a man in a caf\u00e9"]\n}\n'
    (tmp_path / "captions_msvd.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(
        AnnotationError, match=r"captions_msvd\.json: not valid UTF-8 \(byte 0xe9 at line 2, column 26\).*UTF-8"
    ):
        load_annotations("msvd", "test", tmp_path)
    # The same file in UTF-8, with a byte-order mark, is fine.
    (tmp_path / "captions_msvd.json").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_annotations("msvd", "test", tmp_path) == [("a_1_2", ["a man in a caf\u00e9"])]


class _WritesMarkerFile:
    """A pickle payload that, when loaded by the plain unpickler, creates a file: stands for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running_its_code(tmp_path):
    # The payload does run under the plain unpickler: the marker appears.
    witness = tmp_path / "witness"
    loaded = pickle.loads(pickle.dumps({"a_1_2": [_WritesMarkerFile(witness)]}))
    loaded["a_1_2"][0].close()
    assert witness.exists()

    marker = tmp_path / "marker"
    folder = tmp_path / "ann"
    folder.mkdir()
    (folder / "test_list.txt").write_text("a_1_2\n")
    (folder / "raw-captions.pkl").write_bytes(pickle.dumps({"a_1_2": [["a", "man"], _WritesMarkerFile(marker)]}))
    with pytest.raises(AnnotationError, match=r"raw-captions\.pkl: refused to load: the pickle asks for .*open"):
        load_annotations("msvd", "test", folder)
    assert not marker.exists()


def test_pickle_with_non_plain_data_or_garbage_is_refused(tmp_path):
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps({"a_1_2": [{"a", "set"}]}))
    with pytest.raises(AnnotationError, match="holds a set"):
        load_plain_pickle(path)
    path.write_bytes(pickle.dumps({"a_1_2": [b"bytes"]}))
    with pytest.raises(AnnotationError, match="holds a bytes"):
        load_plain_pickle(path)
    path.write_bytes(pickle.dumps({"a_1_2": [["a", "man"]]})[:-5])
    with pytest.raises(AnnotationError, match="not a readable pickle"):
        load_plain_pickle(path)
    path.write_bytes(pickle.dumps({"a_1_2": (["a", "man"], ["two", 2.0, 3])}))
    assert load_plain_pickle(path) == {"a_1_2": (["a", "man"], ["two", 2.0, 3])}
