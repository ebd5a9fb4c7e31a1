"""The backbone is built with the architecture its weights were trained with, decided by open_clip's own pretrained
config, and a config/weights mismatch that open_clip only warns about fails the build. No download: open_clip's
download and checkpoint loading are stubbed, everything else (config lookup, the tag check, model building) is real."""

from pathlib import Path

import open_clip
import pytest
import yaml
from open_clip import factory
from open_clip.transformer import QuickGELU
from torch import nn

from petl_bench.backbone import SYNTHETIC_PRETRAINED, CLIPBackbone, architecture_for_weights

BACKBONE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "backbone").glob("*.yaml"))


@pytest.fixture
def no_download(monkeypatch):
    """open_clip resolves the tag (its real pretrained config) but neither downloads nor loads the weights."""
    loaded = []
    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, **kw: f"/stub/{Path(cfg['url']).name}")
    monkeypatch.setattr(factory, "load_checkpoint", lambda model, path, **kw: loaded.append(path))
    return loaded


def activations(model: nn.Module) -> set[type]:
    return {type(block.mlp.gelu) for tower in (model.visual.transformer, model.transformer)
            for block in tower.resblocks}


def declared_quick_gelu(model_name: str, pretrained: str) -> bool:
    if pretrained == SYNTHETIC_PRETRAINED:  # a local file: the model config declares what it was trained with
        return open_clip.get_model_config(model_name)["quick_gelu"]
    return open_clip.get_pretrained_cfg(model_name, pretrained)["quick_gelu"]


@pytest.mark.parametrize("config", BACKBONE_CONFIGS, ids=lambda p: p.stem)
def test_every_backbone_config_builds_the_activation_its_weights_declare(config, no_download, synthetic_backbone):
    args = yaml.safe_load(config.read_text())["model"]["init_args"]
    backbone = CLIPBackbone(args["backbone"], args["pretrained"])
    want = QuickGELU if declared_quick_gelu(args["backbone"], args["pretrained"]) else nn.GELU
    assert activations(backbone.model) == {want}
    assert backbone.quick_gelu == (want is QuickGELU)
    if args["pretrained"] == "openai":
        assert want is QuickGELU  # OpenAI's CLIPs were trained with QuickGELU
        assert backbone.open_clip_model == f"{args['backbone']}-quickgelu"
        assert no_download == ["/stub/" + Path(open_clip.get_pretrained_cfg(args["backbone"], "openai")["url"]).name]


def test_the_plain_gelu_twin_is_chosen_for_gelu_weights(no_download):
    # laion2b weights were trained with nn.GELU: asking for the -quickgelu config must not apply QuickGELU to them
    assert architecture_for_weights("ViT-B-32-quickgelu", "laion2b_s34b_b79k") == "ViT-B-32"
    assert architecture_for_weights("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32"
    assert architecture_for_weights("ViT-B-16", "openai") == "ViT-B-16-quickgelu"
    assert architecture_for_weights("ViT-B-32", None) == "ViT-B-32"


def test_unknown_tag_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"no pretrained weights 'opneai' for 'ViT-B-32'.*openai"):
        CLIPBackbone("ViT-B-32", "opneai")


def test_a_mismatch_open_clip_only_warns_about_fails_the_build(no_download, monkeypatch):
    # Without the resolution step, open_clip builds nn.GELU for the openai tag and merely warns: that must be an error.
    monkeypatch.setattr("petl_bench.backbone.architecture_for_weights", lambda name, pretrained: name)
    with pytest.raises(ValueError, match=r"'ViT-B-32' does not match pretrained tag 'openai'.*QuickGELU mismatch"):
        CLIPBackbone("ViT-B-32", "openai")
