"""Trainable-only exports and retrieval over a folder of videos (`petl-bench export | index | search`).

One tiny run is trained for 3 steps on the synthetic clips (Cross-Modal Adapter on the synthetic tiny CLIP, through
`execute_run`, the code path of `petl-bench run`); its folder is exported, indexed and searched.
"""

import itertools
import json
import shutil

import lightning as L
import pytest
import torch
import yaml

from petl_bench import index as index_py
from petl_bench.backbone import CLIPBackbone
from petl_bench.cli import main
from petl_bench.export import ExportError, export_module, export_paths, load_export, read_export
from petl_bench.index import build_index, read_embeddings, search_index
from petl_bench.methods import build_method
from tests.conftest import REPO

METHOD = "cross_modal_adapter"


@pytest.fixture(scope="module")
def trained_run(synthetic_root, synthetic_backbone, tmp_path_factory):
    """(run folder, record) of a 3-step run in a sweep's layout: R/synthetic/runs/<name>/ + R/synthetic/<name>.json."""
    from petl_bench.bench.run import execute_run

    tmp = tmp_path_factory.mktemp("run")
    trainer = yaml.safe_load((REPO / "configs/trainer/cpu.yaml").read_text())
    trainer["trainer"]["logger"] = False
    (tmp / "trainer.yaml").write_text(yaml.safe_dump(trainer))
    results = tmp / "results" / "synthetic"
    run_dir = results / "runs" / METHOD
    result = execute_run([
        "--result", str(results / f"{METHOD}.json"), "--method", METHOD,
        "--config", str(tmp / "trainer.yaml"), "--config", str(REPO / "configs/data/synthetic.yaml"),
        "--config", str(REPO / f"configs/model/{METHOD}.yaml"),
        "--config", str(REPO / "configs/backbone/tiny_synthetic.yaml"),
        f"--data.root={synthetic_root}", "--data.num_frames=4", "--data.batch_size=8", "--data.num_workers=0",
        "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--model.init_args.lr=1e-2", "--seed_everything=3",
        f"--trainer.default_root_dir={run_dir}", f"--metrics.save_dir={run_dir}"])
    result.close()
    return run_dir, result.record


@pytest.fixture(scope="module")
def video_dir(synthetic_root, tmp_path_factory):
    """The 18 synthetic test clips (half of them in a sub-folder), a file that is not a video but is named like one,
    and a text file; returns (folder, [(caption, clip file stem)])."""
    folder = tmp_path_factory.mktemp("my_videos")
    (folder / "sub").mkdir()
    items = json.loads((synthetic_root / "annotations" / "test.json").read_text())
    for i, item in enumerate(items):
        shutil.copy(synthetic_root / "videos" / f"{item['video_id']}.mp4",
                    (folder / "sub" if i % 2 else folder) / f"{item['video_id']}.mp4")
    (folder / "broken.mp4").write_bytes(b"this is not a video " * 20)
    (folder / "notes.txt").write_text("not a video, not listed")
    return folder, [(item["captions"][0], item["video_id"]) for item in items]


def _test_metrics(model, data: dict, tmp_path) -> dict:
    from petl_bench.data.datamodule import RetrievalDataModule
    from petl_bench.metrics import RetrievalMetrics

    dm = RetrievalDataModule(**data)
    metrics = RetrievalMetrics(save_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[metrics], default_root_dir=tmp_path)
    trainer.test(model, datamodule=dm, verbose=False)
    return metrics.last_metrics["test"]


def test_export_round_trip_reproduces_the_runs_metrics(trained_run, tmp_path, capsys):
    run_dir, record = trained_run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "cma")]) == 0
    assert "exported CrossModalAdapter" in capsys.readouterr().out
    meta, state = read_export(tmp_path / "cma")
    ckpt = torch.load(run_dir / "checkpoints" / "trainable.ckpt", weights_only=False)
    assert set(state) == set(ckpt["state_dict"]) and not any(k.startswith("clip.") for k in state)
    assert all(torch.equal(state[k], ckpt["state_dict"][k]) for k in state)
    counts = {k: record["params"][k] for k in ("trainable", "total")}  # the record adds CLIP's own count, "clip"
    assert meta["params"] == {**counts, "exported_tensors": len(state), "exported_elements": counts["trainable"]}
    assert (meta["backbone"], meta["pretrained"], meta["num_frames"], meta["max_words"], meta["similarity"],
            meta["frame_protocol"]) == ("petl-tiny-vit", "synthetic", 4, 16, "text_conditioned", "uniform")
    assert meta["metrics"] == record["metrics"]

    fresh = load_export(tmp_path / "cma")  # builds CLIP from its source, then loads the trainable tensors
    metrics = _test_metrics(fresh, meta["data"], tmp_path)
    assert metrics == record["metrics"]  # identical, not close: the same tensors give the same ranks

    # a JSON paired with another export's tensors is refused, naming the file
    other = build_method(METHOD, backbone="petl-tiny-vit", pretrained="synthetic", num_frames=4, max_words=16)
    export_module(other, tmp_path / "other")
    shutil.copy(export_paths(tmp_path / "other")[0], export_paths(tmp_path / "cma")[0])
    with pytest.raises(ExportError, match="does not match"):
        read_export(tmp_path / "cma")


def test_index_and_search_find_each_caption_and_survive_a_broken_file(trained_run, video_dir, tmp_path, capsys):
    run_dir, _ = trained_run
    folder, captions = video_dir
    out = tmp_path / "index"
    assert main(["index", str(folder), "--ckpt", str(run_dir), "--out", str(out), "--frame-protocol", "uniform",
                 "--workers", "0", "--shard-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "indexed 19 video(s)" in printed and "18 new" in printed and "1 unreadable file(s) skipped" in printed
    report = json.loads((out / "report.json").read_text())
    assert [u["video"] for u in report["unreadable"]] == ["broken.mp4"]
    assert "cannot decode video" in report["unreadable"][0]["reason"]
    videos, emb, mask = read_embeddings(out, METHOD)
    assert len(videos) == 18 and "sub/synth_test_00001.mp4" in videos and emb.shape[:2] == mask.shape == (18, 4)

    hits = search_index(out, [c for c, _ in captions], k=5)[METHOD]
    in_top5 = [any(v.rsplit("/", 1)[-1] == f"{vid}.mp4" for v, _ in h) for (_, vid), h in zip(captions, hits)]
    rate = sum(in_top5) / len(in_top5)
    # measured: 17 of 18 captions (94%) find their clip in the top 5 — the run's own test t2v R@5 is 94.4%
    # (the indexed clips are its test split, sampled the same way); "most" is the bar
    assert rate >= 0.75, f"only {sum(in_top5)}/{len(in_top5)} captions find their clip in the top 5"
    assert all(s1 >= s2 for h in hits for (_, s1), (_, s2) in itertools.pairwise(h))

    assert main(["search", str(out), captions[0][0], "-k", "3", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)[METHOD]
    assert [v for v, _ in shown] == [v for v, _ in hits[0][:3]]
    assert main(["search", str(out), captions[0][0], "-k", "3"]) == 0
    assert hits[0][0][0] in capsys.readouterr().out  # the rich table names the best video


def test_a_rerun_skips_finished_videos(trained_run, video_dir, tmp_path, monkeypatch):
    run_dir, _ = trained_run
    source, _ = video_dir
    folder = tmp_path / "videos"
    shutil.copytree(source, folder)
    decoded = []
    real = index_py.load_video
    monkeypatch.setattr(index_py, "load_video", lambda path, *a, **k: decoded.append(path.name) or real(path, *a, **k))
    out = tmp_path / "index"
    first = build_index(folder, [str(run_dir)], out, "uniform", shard_size=4, progress=False)
    assert first.embedded == {METHOD: 18} and len(decoded) == 19
    shards = sorted(p.name for p in (out / "embeddings" / METHOD).iterdir())
    assert len(shards) == 5  # 4 + 4 + 4 + 4 + 2

    decoded.clear()
    again = build_index(folder, [str(run_dir)], out, "uniform", progress=False)
    assert again.embedded == {METHOD: 0} and again.already == {METHOD: 18}
    assert decoded == ["broken.mp4"]  # only the unreadable file is tried again
    assert sorted(p.name for p in (out / "embeddings" / METHOD).iterdir()) == shards

    decoded.clear()
    shutil.copy(folder / "synth_test_00000.mp4", folder / "sub" / "new clip.mp4")
    (folder / "broken.mp4").unlink()
    third = build_index(folder, [str(run_dir)], out, "uniform", progress=False)
    assert third.embedded == {METHOD: 1} and decoded == ["new clip.mp4"] and not third.unreadable
    videos, emb, _ = read_embeddings(out, METHOD)
    assert len(videos) == 19
    assert torch.equal(emb[videos.index("sub/new clip.mp4")], emb[videos.index("synth_test_00000.mp4")])

    with pytest.raises(ValueError, match="frame_protocol"):
        build_index(folder, [str(run_dir)], out, "fps", progress=False)


def test_several_adapters_share_one_backbone_build(trained_run, video_dir, synthetic_backbone, tmp_path,
                                                   monkeypatch):
    """--ckpt a --ckpt b --ckpt c: CLIP is built once; each method's numbers equal those of an index of it alone,
    including a method that trains tensors inside CLIP (BitFit's biases, copied on write)."""
    run_dir, _ = trained_run
    folder, _ = video_dir
    torch.manual_seed(0)
    exports = {}
    for name in ("zero_shot", "bitfit"):
        model = build_method(name, backbone="petl-tiny-vit", pretrained="synthetic", num_frames=4, max_words=16)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if model.is_trainable(n):
                    p.add_(torch.randn_like(p) * 0.05)  # stands in for training
        exports[name] = export_module(model, tmp_path / name)

    builds = []
    real_init = CLIPBackbone.__init__

    def counting_init(self, *args, **kwargs):
        builds.append(args)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(CLIPBackbone, "__init__", counting_init)
    ckpts = [str(run_dir), f"zs={exports['zero_shot']}", f"bitfit={exports['bitfit']}"]
    summary = build_index(folder, ckpts, tmp_path / "shared", "uniform", progress=False)
    assert len(builds) == 1 and summary.backbone["builds"] == 1
    assert summary.embedded == {METHOD: 18, "zs": 18, "bitfit": 18}

    for name, ckpt in zip((METHOD, "zs", "bitfit"), ckpts):
        build_index(folder, [ckpt], tmp_path / f"alone_{name}", "uniform", progress=False)
        shared, alone = read_embeddings(tmp_path / "shared", name), read_embeddings(tmp_path / f"alone_{name}", name)
        assert shared[0] == alone[0] and torch.equal(shared[1], alone[1]), name
    zs, bitfit = read_embeddings(tmp_path / "shared", "zs")[1], read_embeddings(tmp_path / "shared", "bitfit")[1]
    assert not torch.equal(zs, bitfit)  # BitFit's biases changed its numbers, and only its own
    results = search_index(tmp_path / "shared", "a red circle moving left", k=3)
    assert set(results) == {METHOD, "zs", "bitfit"} and all(len(r[0]) == 3 for r in results.values())
