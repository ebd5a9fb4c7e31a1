"""RetrievalModule: similarity heads, loss, what trains, and trainable-only checkpoints that restore exactly."""

import lightning as L
import pytest
import torch

from petl_bench.data.datamodule import RetrievalDataModule
from petl_bench.methods import build_method
from petl_bench.module import meanp_similarity, symmetric_infonce, text_conditioned_similarity


def test_meanp_ignores_padded_frames():
    torch.manual_seed(0)
    text = torch.randn(3, 8)
    frames = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    garbage = frames.clone()
    garbage[0, 2:] = 1e3  # padded frames must not count
    assert torch.allclose(meanp_similarity(text, frames, mask), meanp_similarity(text, garbage, mask))
    one = torch.nn.functional.normalize(frames[0, :2], dim=-1).mean(0)
    expected = torch.nn.functional.cosine_similarity(text, one.expand(3, -1), dim=-1)
    assert torch.allclose(meanp_similarity(text, frames, mask)[:, 0], expected, atol=1e-6)


def test_text_conditioned_pooling_weights_frames_by_the_text():
    text = torch.tensor([[10.0, 0.0]])
    frames = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # frame 0 agrees with the text, frame 1 does not
    mask = torch.ones(1, 2, dtype=torch.bool)
    sharp = text_conditioned_similarity(text, frames, mask, temperature=0.1)
    soft = text_conditioned_similarity(text, frames, mask, temperature=1e6)
    assert sharp.item() == pytest.approx(1.0, abs=1e-4)  # all weight on the matching frame
    assert soft.item() == pytest.approx(2 ** -0.5, abs=1e-4)  # uniform weights: the mean frame
    one_frame = text_conditioned_similarity(text, frames, torch.tensor([[False, True]]))
    assert one_frame.item() == pytest.approx(0.0, abs=1e-6)  # only the real frame is pooled


def test_infonce_is_symmetric_and_minimal_on_the_diagonal():
    logits = torch.eye(4) * 100
    assert symmetric_infonce(logits).item() == pytest.approx(0.0, abs=1e-6)
    lopsided = torch.zeros(4, 4)
    lopsided[0, 1] = 50
    assert symmetric_infonce(lopsided).item() == pytest.approx(symmetric_infonce(lopsided.t()).item())


def test_full_finetune_recipe_counts_and_learning_rates():
    model = build_method("full_finetune", backbone="ViT-B-32", pretrained=None)
    counts = model.parameter_counts()
    # 151,277,313 minus what CLIP4Clip freezes: token (25,296,896) + text positional (39,424) embeddings, conv1
    # (2,359,296), class embedding (768), visual positional embedding (38,400), ln_pre (1,536)
    assert counts == {"trainable": 123_540_993, "total": 151_277_313}
    assert model.param_lr("clip.model.visual.transformer.resblocks.0.attn.in_proj_weight") == 1e-7
    assert not model.clip.model.token_embedding.weight.requires_grad
    assert model.clip.model.logit_scale.requires_grad


def test_logit_scale_is_clamped():
    model = build_method("zero_shot", backbone="petl-tiny-vit", pretrained=None)
    with torch.no_grad():
        model.clip.model.logit_scale.fill_(10.0)  # exp(10) ≫ 100
    assert model.logit_scale().item() == pytest.approx(100.0)


def _tiny_method(name, ckpt, **kw):
    return build_method(name, backbone="petl-tiny-vit", pretrained=str(ckpt), num_frames=4, max_words=16, **kw)


def test_checkpoint_holds_only_trainable_weights_and_restores_outputs(synthetic_root, synthetic_backbone, tmp_path):
    L.seed_everything(0)
    model = _tiny_method("cross_modal_adapter", synthetic_backbone, lr=1e-2)
    dm = RetrievalDataModule("synthetic", root=str(synthetic_root), backbone="petl-tiny-vit", num_frames=4,
                             max_words=16, batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "trainable.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert set(saved["state_dict"]) == set(model.trainable_names())
    assert not any(k.startswith("clip.") for k in saved["state_dict"])
    assert saved["optimizer_states"], "optimizer state is kept so a run can resume"

    restored = type(model).load_from_checkpoint(path).eval()
    model.eval()
    batch = next(iter(dm.test_dataloader()[0]))  # the synthetic set has no validation split
    text = next(iter(dm.test_dataloader()[1]))["text"]
    with torch.no_grad():
        assert torch.equal(model.encode_video(batch["video"], batch["video_mask"]),
                           restored.encode_video(batch["video"], batch["video_mask"]))
        assert torch.equal(model.encode_text(text), restored.encode_text(text))
    fresh = _tiny_method("cross_modal_adapter", synthetic_backbone)
    with torch.no_grad():
        assert not torch.equal(fresh.encode_text(text), restored.encode_text(text)), "training changed nothing?"


def test_loading_a_checkpoint_of_another_method_is_refused(synthetic_backbone, tmp_path):
    model = _tiny_method("cross_modal_adapter", synthetic_backbone)
    other = _tiny_method("full_finetune", synthetic_backbone)
    ckpt = {"state_dict": {k: v for k, v in model.state_dict().items() if k in set(model.trainable_names())}}
    with pytest.raises(KeyError, match="does not have"):
        other.on_load_checkpoint(ckpt)


def test_zero_shot_cannot_be_fitted(synthetic_backbone):
    model = _tiny_method("zero_shot", synthetic_backbone)
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        model.configure_optimizers()
