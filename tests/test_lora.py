"""LoRA weights in an adapter folder (what `qzoom train sft` writes): loaded with the adapter,
merged or kept apart, changing the logits exactly as peft's own model does."""

import json
import sys

import pytest
import torch
from zoomkit import trained_adapter

from qzoom_cli import QZoom
from qzoom_cli.training.settings import LoraSettings
from qzoom_cli.training.sft import attach_lora, decoder_pattern
from qzoom_cli.zoom.lora import LORA_FOLDER

QUESTION = "What is the total due?"


def _logits(qz, image):
    bb = qz.backbone
    encoding = bb.encode_image(bb.fit_image(image, qz.default_budget("never")))
    inputs = bb.prepare_inputs(bb.build_prompt(QUESTION, [encoding.grid]), [encoding])
    with torch.no_grad():
        hidden = bb.run_layers(inputs.embeds, inputs.positions, None, 0, bb.num_layers, None, inputs.additions)
        return bb.logits(hidden[:, -1:])[0, -1]


@pytest.fixture(scope="module")
def tuned(tiny_dir, tmp_path_factory):
    """An adapter folder with zoom weights and random (non-zero) LoRA weights, and peft's logits."""
    import io

    from docmaker import make_image
    from PIL import Image

    image = Image.open(io.BytesIO(make_image("PNG", size=(320, 240))))
    folder = tmp_path_factory.mktemp("tuned")
    qz = QZoom.from_pretrained(str(tiny_dir), device="cpu")
    base = _logits(qz, image)
    trained_adapter(qz.backbone).save_pretrained(folder)
    wrapped = attach_lora(qz.backbone, LoraSettings(rank=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in wrapped.named_parameters():
            if "lora_" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    wrapped.save_pretrained(folder / LORA_FOLDER)
    with torch.no_grad():
        merged = _logits(qz, image)  # peft's own layers in the model, as training leaves them
    return folder, image, base, merged


@pytest.mark.parametrize("merge", [True, False])
def test_lora_weights_load_with_the_adapter_and_change_the_logits_as_peft_does(tiny_dir, tuned, merge):
    import peft

    folder, image, base, peft_logits = tuned
    qz = QZoom.from_pretrained(str(tiny_dir), adapter=str(folder), device="cpu", merge_lora=merge)
    q_proj = qz.backbone.decoder_layers[0].self_attn.q_proj
    assert isinstance(q_proj, peft.tuners.lora.LoraLayer) != merge  # merged: plain Linear layers again
    logits = _logits(qz, image)
    assert not torch.allclose(logits, base, atol=1e-3)
    assert torch.allclose(logits, peft_logits, atol=1e-5)


def test_lora_reaches_only_the_decoder_layers(qz):
    import re

    pattern = decoder_pattern(qz.backbone, ("q_proj", "down_proj"))
    names = [name for name, _ in qz.backbone.model.named_modules() if re.fullmatch(pattern, name)]
    assert len(names) == 2 * qz.backbone.num_layers
    assert all(name.startswith("model.language_model.layers.") for name in names)


def test_lora_for_another_model_is_refused(tiny_dir, tuned, tmp_path):
    from qzoom_cli.errors import AdapterMismatch

    folder, *_ = tuned
    config = json.loads((folder / LORA_FOLDER / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    (bad / LORA_FOLDER).mkdir(parents=True)
    for name in ("qzoom_config.json", "qzoom_adapter.safetensors"):
        (bad / name).write_bytes((folder / name).read_bytes())
    (bad / LORA_FOLDER / "adapter_config.json").write_text(json.dumps({**config, "r": 7}))
    (bad / LORA_FOLDER / "adapter_model.safetensors").write_bytes(
        (folder / LORA_FOLDER / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterMismatch, match="do not fit"):
        QZoom.from_pretrained(str(tiny_dir), adapter=str(bad), device="cpu")


@pytest.mark.parametrize("command", ["ask", "run", "eval", "bench", "serve"])
def test_every_command_with_an_adapter_takes_no_merge(command, tiny_dir, tuned, monkeypatch):
    from zoomkit import COMMAND_ARGS, load_model_arguments

    args = [*COMMAND_ARGS[command], "--model", str(tiny_dir), "--adapter", str(tuned[0]), "--no-merge"]
    assert load_model_arguments(args, monkeypatch)["no_merge"] is True


def test_without_peft_lora_weights_are_an_environment_problem(monkeypatch):
    from qzoom_cli.errors import EXIT_MODEL, EnvironmentProblem
    from qzoom_cli.zoom.lora import import_peft

    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without it imports
    hint = r"^LoRA weights need peft .*: pip install 'peft>=0\.17,<1'$"
    with pytest.raises(EnvironmentProblem, match=hint) as caught:
        import_peft()
    assert caught.value.exit_code == EXIT_MODEL


def test_an_adapter_on_a_tuned_decoder_saves_its_lora_along(tiny_dir, tuned, tmp_path):
    """Zoom modules learned on a LoRA-tuned decoder only fit that decoder: their folder carries it."""
    folder, image, _, peft_logits = tuned
    qz = QZoom.from_pretrained(str(tiny_dir), adapter=str(folder), device="cpu")
    for _ in range(2):  # a later checkpoint saved over the first
        qz.adapter.save_pretrained(tmp_path / "copy")
    again = QZoom.from_pretrained(str(tiny_dir), adapter=str(tmp_path / "copy"), device="cpu")
    assert torch.allclose(_logits(again, image), peft_logits, atol=1e-5)


def test_lora_is_attached_with_the_settings_rank_alpha_and_dropout(tiny_dir):
    qz = QZoom.from_pretrained(str(tiny_dir), device="cpu")  # its own model: attaching wraps it
    config = attach_lora(qz.backbone, LoraSettings(rank=4, alpha=12, dropout=0.1)).peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 12, 0.1)


def test_a_model_whose_decoder_layers_are_elsewhere_is_refused():
    from types import SimpleNamespace

    from qzoom_cli.errors import AdapterMismatch

    backbone = SimpleNamespace(family="odd", model=torch.nn.Linear(1, 1), decoder_layers=torch.nn.ModuleList())
    with pytest.raises(AdapterMismatch) as refused:
        decoder_pattern(backbone, ("q_proj",))
    assert str(refused.value) == "odd: the decoder layers are not part of the model"
