"""Every user-caused failure is a named QZoomError with its exit code, and every command reports
errors through the one boundary at the root command."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner
from zoomkit import trained_adapter

from qzoom_cli import cli
from qzoom_cli.budget import VisualBudget
from qzoom_cli.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    AdapterMismatch,
    EnvironmentProblem,
    IncompatibleCheckpoint,
    ModelError,
    QZoomError,
)
from qzoom_cli.zoom.adapter import ADAPTER_WEIGHTS, AdapterConfig, ZoomAdapter, official_adapter_config
from qzoom_cli.zoom.fuse import fuse_region
from qzoom_cli.zoom.geometry import Box

runner = CliRunner()


@pytest.fixture
def saved_adapter(qz, tmp_path):
    trained_adapter(qz.backbone).save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def _edit_weights(folder, change):
    weights = load_file(folder / ADAPTER_WEIGHTS)
    change(weights)
    save_file(weights, folder / ADAPTER_WEIGHTS)


def _missing_and_unexpected(weights):
    weights.pop("high_res_head.bias")
    weights["twig_layers.7.mlp.up_proj.weight"] = torch.zeros(1)


@pytest.mark.parametrize("change, message", [
    (lambda w: w.pop("high_res_head.bias"), "do not match the adapter config: missing 1 (e.g. high_res_head.bias)"),
    (lambda w: w.__setitem__("twig_layers.7.mlp.up_proj.weight", torch.zeros(1)), "unexpected 1"),
    (_missing_and_unexpected, "missing 1 (e.g. high_res_head.bias); unexpected 1 (e.g. twig_layers.7.mlp.up_proj"),
    (lambda w: w.__setitem__("high_res_head.weight", torch.zeros(1, 3)), "has shape (1, 3)"),
])
def test_adapter_weights_that_do_not_match_their_config_are_refused(qz, saved_adapter, change, message):
    _edit_weights(saved_adapter, change)
    with pytest.raises(AdapterMismatch) as caught:
        ZoomAdapter.from_pretrained(saved_adapter, qz.backbone)
    assert message in caught.value.message and str(saved_adapter) in caught.value.message
    assert caught.value.exit_code == EXIT_MODEL


def test_a_folder_without_both_adapter_files_is_not_an_adapter(qz, saved_adapter):
    from qzoom_cli.errors import ModelNotAvailable

    (saved_adapter / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(ModelNotAvailable, match="is not a qzoom adapter"):
        ZoomAdapter.from_pretrained(saved_adapter, qz.backbone)


@pytest.mark.parametrize("config, message", [
    (AdapterConfig(branch_layer=2, depth=2, family="qwen3_vl"),
     "^adapter is for qwen3_vl models, the base model is qwen2_5_vl$"),
    (AdapterConfig(branch_layer=1, depth=1, hidden_size=999),
     "^adapter expects hidden size 999, the base model has 64$"),
    (AdapterConfig(branch_layer=3, depth=2), "^branch after layer 3 with 2 layers does not fit a 4-layer model$"),
    (AdapterConfig(branch_layer=4, depth=1), "does not fit"),
    (AdapterConfig(branch_layer=0, depth=2), "does not fit"),
    (AdapterConfig(branch_layer=2, depth=0), "does not fit"),
])
def test_adapters_that_do_not_fit_the_model_are_refused(qz, config, message):
    with pytest.raises(AdapterMismatch, match=message):
        ZoomAdapter(config, qz.backbone)


@pytest.mark.parametrize("branch_layer, depth", [(1, 1), (1, 3), (3, 1)])
def test_adapters_that_fit_the_model_are_built(qz, branch_layer, depth):
    adapter = ZoomAdapter(AdapterConfig(branch_layer=branch_layer, depth=depth, hidden_size=qz.backbone.hidden_size,
                                        family=qz.backbone.family), qz.backbone)
    assert len(adapter.twig_layers) == len(adapter.high_res_layers) == depth


def _official_backbone(settings):
    return SimpleNamespace(model_id="someone/q-zoom", family="qwen2_5_vl", hidden_size=64,
                           checkpoint_setting=lambda name, default=None: settings.get(name, default))


@pytest.mark.parametrize("settings, expected", [
    ({}, None),
    ({"enable_twig": False, "twig_K": 2, "twig_T": 3}, None),
    ({"enable_twig": True, "twig_K": 2, "twig_T": 3}, {}),
    ({"enable_twig": True, "twig_K": 2, "twig_T": 3, "enable_high_res": True, "high_res_thresh": 0.3,
      "reuse_src_pos": True}, {"gate": True, "gate_threshold": 0.3, "reuse_src_pos": True}),
    ({"enable_twig": True, "twig_K": 2, "twig_T": 3, "enable_high_res": True, "high_res_K": 2, "high_res_T": 3},
     {"gate": True}),
])
def test_the_official_checkpoint_keys_become_an_adapter_config(settings, expected):
    """Released checkpoints say in config.json where the branch is, whether a gate is there, its
    threshold, and whether region positions are aligned; the modules' shapes come from the model."""
    config = official_adapter_config(_official_backbone(settings))
    if expected is None:
        assert config is None
    else:
        assert config == AdapterConfig(branch_layer=2, depth=3, **{"gate": False, **expected}, family="qwen2_5_vl",
                                       hidden_size=64, base_model="someone/q-zoom")
        assert config.region_head


@pytest.mark.parametrize("settings, message", [
    ({"enable_twig": True, "twig_K": "2", "twig_T": 2},
     "^someone/q-zoom sets enable_twig but not integer twig_K/twig_T$"),
    ({"enable_twig": True, "twig_K": 2, "twig_T": None}, "not integer twig_K/twig_T"),
    ({"enable_twig": True, "twig_K": 2, "twig_T": 2, "enable_high_res": True, "high_res_K": 1},
     "^someone/q-zoom: a gate branching apart from the region head is not supported$"),
    ({"enable_twig": True, "twig_K": 2, "twig_T": 2, "enable_high_res": True, "high_res_T": 1},
     "a gate branching apart"),
])
def test_official_zoom_settings_that_cannot_be_honoured_are_refused(settings, message):
    with pytest.raises(AdapterMismatch, match=message):
        official_adapter_config(_official_backbone(settings))


def test_an_unknown_adapter_config_key_is_a_model_error(qz, saved_adapter):
    config = json.loads((saved_adapter / "qzoom_config.json").read_text())
    (saved_adapter / "qzoom_config.json").write_text(json.dumps({**config, "colour": "red"}))
    with pytest.raises(ModelError, match="colour"):
        ZoomAdapter.from_pretrained(saved_adapter, qz.backbone)


def test_a_processor_that_makes_another_grid_is_an_incompatible_checkpoint(qz, monkeypatch):
    bb = qz.backbone
    real = bb.image_processor

    def other_grid(**kwargs):
        out = real(**kwargs)
        out["image_grid_thw"] = out["image_grid_thw"] * torch.tensor([[1, 2, 1]])
        return out

    monkeypatch.setattr(bb, "image_processor", other_grid)
    with pytest.raises(IncompatibleCheckpoint, match="produced grid"):
        bb.encode_image(bb.fit_image(make_page(), VisualBudget(16, 64)))


def test_a_chat_template_that_drops_the_image_is_an_incompatible_checkpoint(qz, monkeypatch):
    monkeypatch.setattr(qz.backbone.tokenizer, "apply_chat_template", lambda *a, **k: "no image here")
    with pytest.raises(IncompatibleCheckpoint, match="did not place 1 image"):
        qz.backbone.build_prompt("q?", [(2, 2)])


def test_a_checkpoint_without_an_end_token_is_incompatible():
    from qzoom_cli.backbones.stock import _eos_token_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    with pytest.raises(IncompatibleCheckpoint, match="end-of-sequence"):
        _eos_token_ids(model, SimpleNamespace(eos_token_id=None))


@pytest.mark.parametrize("change", ["a token before the page", "the page's grid"])
def test_a_template_that_moves_the_image_when_a_region_is_added_is_incompatible(qz, monkeypatch, change):
    """Either change alone breaks the reuse of the coarse pass's cache: the ids before the page's
    last token, or where its tokens sit (as many tokens in another shape: the ids still agree)."""
    bb = qz.backbone
    page = bb.encode_image(bb.fit_image(make_page(), VisualBudget(16, 64)))
    coarse = bb.build_prompt("q?", [page.grid])
    region = bb.encode_image(bb.fit_image(make_page(), VisualBudget(4, 16)))
    real = bb.build_prompt
    assert page.grid[0] != page.grid[1]

    def moved(text, grids):
        if change == "the page's grid":
            return real(text, [grids[0][::-1], *grids[1:]])
        prompt = real(text, grids)
        ids = prompt.input_ids.clone()
        ids[0, 0] += 1
        return replace(prompt, input_ids=ids)

    monkeypatch.setattr(bb, "build_prompt", moved)
    message = "^the fused prompt does not extend the coarse prompt; the chat template moved the image$"
    with pytest.raises(IncompatibleCheckpoint, match=message):
        fuse_region(bb, "q?", coarse, page, region, Box(0, 0, 1, 1), aligned=False)


def test_damaged_model_cards_are_an_environment_problem(tmp_path, monkeypatch):
    from qzoom_cli import cards

    monkeypatch.setattr(cards, "cards_dir", lambda: tmp_path)
    (tmp_path / "a.toml").write_text('id = "a/b"\nfamily = "qwen2_5_vl"\npatch_factor = 28\n')
    with pytest.raises(EnvironmentProblem, match="exactly one default model card"):
        cards.default_card()
    (tmp_path / "b.toml").write_text("id = [unclosed")
    with pytest.raises(EnvironmentProblem, match="b.toml is damaged"):
        cards.load_cards()
    result = runner.invoke(cli.app, ["models", "list"])
    assert result.exit_code == EXIT_MODEL and result.stderr.startswith("qzoom: error: model card")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["run", "{m}", "--model", "{tiny}"],
    ["eval", "{m}", "--model", "{tiny}"],
    ["bench", "{m}", "--model", "{tiny}", "--out", "{out}"],
    ["train", "rpn", "--json", "{m}", "--out", "{out}", "--model", "{tiny}"],
    ["train", "gate", "--json", "{m}", "--out", "{out}", "--model", "{tiny}"],
])
def test_every_command_reports_through_the_one_boundary(argv, tmp_path, tiny_dir, monkeypatch):
    """The same failure in any command: a QZoomError is its line and code, Ctrl-C 130, a bug exit 1
    with its traceback under -v."""
    from qzoom_cli import manifest

    argv = [a.format(m=tmp_path / "m.jsonl", tiny=tiny_dir, out=tmp_path / "out") for a in argv]
    for raised, code, line in [(EnvironmentProblem("the disk is gone"), EXIT_MODEL, "qzoom: error: the disk is gone"),
                               (KeyboardInterrupt(), EXIT_INTERRUPTED, "qzoom: interrupted"),
                               (RuntimeError("boom"), EXIT_INTERNAL, "qzoom: internal error: RuntimeError: boom")]:
        def fail(*args, error=raised, **kwargs):
            raise error

        monkeypatch.setattr(manifest, "read_manifest", fail)
        result = runner.invoke(cli.app, argv)
        assert result.exit_code == code and result.stderr.startswith(line), result.stderr
        assert "Traceback" not in result.stderr
    verbose = runner.invoke(cli.app, [*argv, "-v"])
    assert verbose.exit_code == EXIT_INTERNAL and "Traceback" in verbose.stderr


def test_user_caused_failures_are_never_internal():
    """Each error class a user can cause names itself in the record and maps to a documented exit code."""
    from qzoom_cli import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, QZoomError)
               and c is not QZoomError]
    assert len(classes) >= 18
    assert all(c.exit_code in (2, 3, 4, 6) and c.code != "internal" for c in classes)
    assert len({c.code for c in classes}) == len(classes)


def make_page():
    from PIL import Image

    return Image.new("RGB", (300, 200), "white")
