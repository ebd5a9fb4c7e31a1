"""Post-processing as a labelled axis (issue 15): DSL, QB-Norm and Sinkhorn by their definitions, reported beside the
plain numbers (never instead of them), with a bank of *training* queries, and parameters chosen on validation only."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import petl_bench.metrics as metrics_module
from petl_bench.metrics import (
    METRIC_NAMES,
    RetrievalMetrics,
    choose_parameters,
    postprocess,
    querybank_normalise,
    sinkhorn_bias,
    t2v_metrics,
)
from tests.test_datamodule import SIMPLE, datamodule, msvd_folder
from tests.test_metrics import CaptionFeatures, TinyRetrievalData, TinyRetrievalModule, VideoFeatures, make_trainer

ALL = ("dsl", "qb_norm", "sinkhorn")
BANK = {"querybank_captions": 8, "querybank_videos": 5, "querybank_seed": 3}

# ---------------------------------------------------------------------------------------------------------------------
# The functions, by their definitions
# ---------------------------------------------------------------------------------------------------------------------


def test_querybank_normalise_is_the_dynamic_inverted_softmax():
    generator = torch.Generator().manual_seed(0)
    sim = torch.rand(30, 40, generator=generator, dtype=torch.float64)
    bank = torch.rand(6, 40, generator=generator, dtype=torch.float64)  # few bank queries: a small activation set
    for k, beta in ((1, 20.0), (2, 5.0)):
        out = querybank_normalise(sim, bank, k, beta)
        # the paper's form in the exp domain, one query at a time
        active = {int(g) for row in bank for g in row.topk(k).indices}
        normalised = 0
        for q in range(sim.shape[0]):
            if int(sim[q].argmax()) in active:
                expected = torch.exp(beta * sim[q]) / torch.exp(beta * bank).sum(0)
                assert torch.allclose(out[q], expected.log(), atol=1e-10)
                normalised += 1
            else:
                assert torch.equal(out[q], sim[q])
        assert 0 < normalised < sim.shape[0]  # both branches ran


def test_sinkhorn_bias_is_the_sinkhorn_knopp_column_scaling():
    generator = torch.Generator().manual_seed(1)
    bank = torch.rand(40, 9, generator=generator, dtype=torch.float64)
    temperature, iterations = 0.05, 4
    # exp domain: b = 1 / column sums, then (a = 1 / (K b), b = 1 / (a K)) per iteration
    kernel = torch.exp(bank / temperature)
    b = 1 / kernel.sum(0)
    for _ in range(iterations):
        a = 1 / (kernel @ b)
        b = 1 / (a @ kernel)
    ours = sinkhorn_bias(bank, temperature, iterations)
    difference = ours - b.log()
    assert float(difference.max() - difference.min()) < 1e-9  # equal up to a constant, which no ranking sees
    # converged on a square bank, the scaled kernel is doubly stochastic
    square = torch.rand(9, 9, generator=generator, dtype=torch.float64)
    logits = square / temperature
    col = sinkhorn_bias(square, temperature, 500)
    row = -torch.logsumexp(logits + col[None, :], dim=1)
    plan = torch.exp(logits + row[:, None] + col[None, :])
    assert torch.allclose(plan.sum(0), torch.ones(9, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(plan.sum(1), torch.ones(9, dtype=torch.float64), atol=1e-6)


def test_every_postprocessing_demotes_a_hub_video():
    """A video close to every caption steals R@1 from the true videos; each method undoes most of that."""
    generator = torch.Generator().manual_seed(2)
    num = 30
    sim = 0.3 * torch.eye(num) + 0.05 * torch.randn(num, num, generator=generator)
    sim[:, 0] += 0.45  # the hub
    cap_to_vid = torch.arange(num)
    bank = 0.05 * torch.randn(200, num, generator=generator)  # training queries like the hub too
    bank[:, 0] += 0.45
    plain = t2v_metrics(sim, cap_to_vid)["R@1"]
    assert plain < 20
    params = {"dsl": {"temperature": 0.01}, "qb_norm": {"k": 1, "beta": 20.0},
              "sinkhorn": {"temperature": 0.01, "iterations": 4}}
    for name in ALL:
        t2v, _ = postprocess(name, sim, params[name], bank, bank)
        assert t2v_metrics(t2v, cap_to_vid)["R@1"] > plain + 50, name


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="unknown post-processing"):
        RetrievalMetrics(postprocessing=["qbnorm"])
    assert RetrievalMetrics(postprocessing=["none"]).postprocessing == []
    with pytest.raises(ValueError, match="bank"):
        postprocess("qb_norm", torch.rand(3, 3), {"k": 1, "beta": 1.0})


# ---------------------------------------------------------------------------------------------------------------------
# The callback: a validation set, a different test set and a training set for the bank
# ---------------------------------------------------------------------------------------------------------------------


class SplitData(TinyRetrievalData):
    """Val: 7 videos / 11 captions (the parent's); test: 9 / 13; train: 12 / 20, the querybank's only source."""

    def __init__(self):
        super().__init__()
        self.test_videos = VideoFeatures(9, seed=3)
        self.test_captions = CaptionFeatures(self.test_videos, [5, 0, 8, 1, 2, 7, 3, 4, 6, 0, 8, 2, 5], seed=4)
        self.train_videos = VideoFeatures(12, seed=5)
        self.train_captions = CaptionFeatures(self.train_videos, [i % 12 for i in range(20)], seed=6)

    def test_dataloader(self):
        return [DataLoader(self.test_videos, batch_size=2), DataLoader(self.test_captions, batch_size=2)]

    def bank_rows(self, num_captions, num_videos, seed):
        generator = torch.Generator().manual_seed(seed)
        videos = torch.randperm(len(self.train_videos), generator=generator)[:num_videos].sort().values
        captions = torch.randperm(len(self.train_captions), generator=generator)[:num_captions].sort().values
        return videos, captions

    def querybank_dataloaders(self, num_captions, num_videos, seed=0, rank=0, world_size=1):
        videos, captions = self.bank_rows(num_captions, num_videos, seed)
        return [DataLoader(Subset(self.train_videos, videos[rank::world_size].tolist()), batch_size=3),
                DataLoader(Subset(self.train_captions, captions[rank::world_size].tolist()), batch_size=3)]


def _embed(module, videos, captions, video_rows=slice(None), caption_rows=slice(None)):
    with torch.no_grad():
        return module.text_proj(captions.text[caption_rows]), module.video_proj(videos.frames[video_rows]), \
            videos.mask[video_rows]


def _reference(module, data, which, name=None, params=None):
    """Plain (or post-processed) metrics computed directly: whole tables, the bank from the training set."""
    videos, captions = (data.videos, data.captions) if which == "val" else (data.test_videos, data.test_captions)
    text, video, mask = _embed(module, videos, captions)
    sim = module.similarity(text, video, mask)
    callback = RetrievalMetrics()
    if name is None:
        return callback.compute(sim, captions.video_index), sim
    bank_videos, bank_captions = data.bank_rows(BANK["querybank_captions"], BANK["querybank_videos"],
                                                BANK["querybank_seed"])
    bank_text, bank_video, bank_mask = _embed(module, data.train_videos, data.train_captions, bank_videos,
                                              bank_captions)
    t2v_bank = module.similarity(bank_text, video, mask)
    v2t_bank = module.similarity(text, bank_video, bank_mask).T
    t2v, v2t = postprocess(name, sim, params, t2v_bank, v2t_bank)
    return callback.compute(t2v, captions.video_index, v2t), sim


def test_postprocessed_numbers_sit_beside_unchanged_plain_numbers(tmp_path):
    module, data = TinyRetrievalModule(), SplitData()
    plain = RetrievalMetrics(save_dir=str(tmp_path / "plain"))
    make_trainer(tmp_path / "plain", plain).validate(module, datamodule=data)
    post = RetrievalMetrics(save_dir=str(tmp_path / "post"), postprocessing=["none", *ALL], **BANK)
    trainer = make_trainer(tmp_path / "post", post)
    trainer.validate(module, datamodule=data)

    got = post.last_metrics["val"]
    assert {k: v for k, v in got.items() if k.split("/")[0] not in ALL} == plain.last_metrics["val"]  # exactly
    with open(tmp_path / "post" / "val_metrics.json") as f:
        saved = json.load(f)
    for name in ALL:
        params = post.grids[name][0]
        expected, _ = _reference(module, data, "val", name, params)
        assert {k.removeprefix(f"{name}/"): v for k, v in got.items() if k.startswith(f"{name}/")} == pytest.approx(
            expected, abs=1e-9
        )
        for direction in ("t2v", "v2t"):
            assert all(f"val/{name}/{direction}/{m}" in trainer.callback_metrics for m in METRIC_NAMES)
        assert saved["postprocessing"][name]["params"] == params
        assert saved["postprocessing"][name]["chosen_on"] == "config"
    assert saved["postprocessing"]["qb_norm"]["querybank"] == {"num_captions": 8, "num_videos": 5, "seed": 3,
                                                               "split": "train"}


def test_parameters_are_chosen_on_validation_never_on_test(tmp_path, monkeypatch):
    data, seen = SplitData(), []
    callback = RetrievalMetrics(save_dir=str(tmp_path), postprocessing=list(ALL), dsl_temperature=[0.01, 0.1, 1.0],
                                qb_norm_beta=[2.0, 20.0], sinkhorn_iterations=[0, 4], **BANK)
    trainer = make_trainer(tmp_path, callback, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)

    def spy(name, grid, sim, *args, **kwargs):
        assert not trainer.testing, "a post-processing parameter was chosen during test"
        choice = choose_parameters(name, grid, sim, *args, **kwargs)
        seen.append((name, sim.clone(), choice[0]))
        return choice

    monkeypatch.setattr(metrics_module, "choose_parameters", spy)
    trainer.fit(TinyRetrievalModule(), datamodule=data)
    module = trainer.lightning_module
    trainer.test(module, datamodule=data)

    _, val_sim = _reference(module, data, "val")
    assert sorted(name for name, _, _ in seen) == sorted(ALL)  # once each, at the one validation epoch
    for _, sim, _ in seen:
        assert sim.shape == (11, 7) and torch.allclose(sim, val_sim, atol=1e-6)  # the validation matrix, only
    with open(tmp_path / "test_metrics.json") as f:
        saved = json.load(f)
    test_metrics = callback.last_metrics["test"]
    plain_test, _ = _reference(module, data, "test")
    plain_test.update(num_videos=9.0, num_captions=13.0)
    assert {k: v for k, v in test_metrics.items() if k.split("/")[0] not in ALL} == pytest.approx(plain_test, abs=1e-9)
    for name, _, chosen in seen:
        record = saved["postprocessing"][name]
        assert (record["chosen_on"], record["params"], record["global_step"]) == ("val", chosen, 1)
        expected, _ = _reference(module, data, "test", name, chosen)
        assert {k.removeprefix(f"{name}/"): v for k, v in test_metrics.items()
                if k.startswith(f"{name}/")} == pytest.approx(expected, abs=1e-9)


def test_a_grid_without_a_validation_choice_is_not_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_module, "choose_parameters", lambda *a, **k: pytest.fail("chosen on test"))
    callback = RetrievalMetrics(save_dir=str(tmp_path), postprocessing=["dsl", "qb_norm"], dsl_temperature=[0.01, 1.0],
                                **BANK)
    with pytest.warns(UserWarning, match="never chosen on the test set"):
        make_trainer(tmp_path, callback).test(TinyRetrievalModule(), datamodule=SplitData())
    got = callback.last_metrics["test"]
    assert "t2v/R@1" in got and "qb_norm/t2v/R@1" in got  # fixed parameters are reported
    assert not [k for k in got if k.startswith("dsl/")]


def test_a_bank_needs_the_datamodule_to_provide_training_queries(tmp_path):
    callback = RetrievalMetrics(postprocessing=["sinkhorn"])
    with pytest.raises(TypeError, match="querybank_dataloaders"):
        make_trainer(tmp_path, callback).validate(TinyRetrievalModule(), datamodule=TinyRetrievalData())


def test_datamodule_querybank_is_a_seeded_share_of_the_training_split(tmp_path):
    dm = datamodule("msvd", msvd_folder(tmp_path, SIMPLE), max_words=16)
    dm.setup("test")
    train = dm.table("train")

    def rows(seed, rank=0, world_size=1):
        videos, captions = dm.querybank_dataloaders(num_captions=4, num_videos=2, seed=seed, rank=rank,
                                                    world_size=world_size)
        return ([r for b in videos for r in b["index"].tolist()], [r for b in captions for r in b["index"].tolist()])

    videos, captions = rows(0)
    assert len(videos) == 2 and len(captions) == 4 and rows(0) == (videos, captions)
    assert {train.video_ids[v] for v in videos} <= set(SIMPLE["train"])  # training videos only
    assert {train.captions[c] for c in captions} <= {c for caps in SIMPLE["train"].values() for c in caps}
    shares = [rows(0, rank, 2) for rank in (0, 1)]
    assert sorted(shares[0][0] + shares[1][0]) == sorted(videos) and not set(shares[0][1]) & set(shares[1][1])
    assert any(rows(seed) != (videos, captions) for seed in (1, 2, 3))


def test_bank_free_numbers_do_not_depend_on_the_bank(tmp_path):
    """DSL is computed without a bank; asking for it alone never calls the querybank loaders."""
    class NoBank(SplitData):
        def querybank_dataloaders(self, *args, **kwargs):
            raise AssertionError("the querybank was built for a bank-free post-processing")

    callback = RetrievalMetrics(save_dir=str(tmp_path), postprocessing=["dsl"])
    make_trainer(tmp_path, callback).validate(TinyRetrievalModule(), datamodule=NoBank())
    assert math.isfinite(callback.last_metrics["val"]["dsl/t2v/R@1"])
    assert os.path.isfile(tmp_path / "val_metrics.json")


def test_report_shows_postprocessed_columns_only_when_present_and_labelled():
    from petl_bench.bench.report import _postprocessing_legend, _present_columns

    plain = {"metrics": {"t2v/R@1": 40.0, "v2t/R@1": 41.0}, "params": {}}
    titles = [title for title, _, _ in _present_columns([plain])]
    assert titles == ["T2V R@1", "V2T R@1"] and not _postprocessing_legend(_present_columns([plain]))
    post = {"metrics": {**plain["metrics"], "dsl/t2v/R@1": 45.0, "dsl/v2t/R@1": 46.0}, "params": {}}
    columns = _present_columns([plain, post])
    assert [title for title, _, _ in columns] == ["T2V R@1", "V2T R@1", "T2V R@1 (DSL)", "V2T R@1 (DSL)"]
    assert "never on test" in _postprocessing_legend(columns)[0]


@pytest.mark.slow  # two fresh interpreters: 45-70 s on 2 busy CPU cores
def test_ddp_two_processes_postprocess_like_one(tmp_path):
    """The bank is embedded in shares (rank::2) and gathered; every number matches one process."""
    from tests.test_metrics import RankReportingMetrics

    options = {"v2t_protocol": "both", "chunk_size": 2, "postprocessing": list(ALL), **BANK}
    single = RetrievalMetrics(save_dir=str(tmp_path / "single"), **options)
    make_trainer(tmp_path / "single", single).validate(TinyRetrievalModule(), datamodule=SplitData())
    report_dir = tmp_path / "ddp"
    report_dir.mkdir()
    ddp = RankReportingMetrics(save_dir=str(report_dir), **options)
    make_trainer(report_dir, ddp, devices=2, strategy="ddp_spawn", logger=False).validate(
        TinyRetrievalModule(), datamodule=SplitData()
    )
    expected = single.last_metrics["val"]
    assert "qb_norm/v2t_any/R@1" in expected
    for rank in (0, 1):
        with open(report_dir / f"rank{rank}.json") as f:
            assert json.load(f) == pytest.approx(expected, abs=1e-9)
