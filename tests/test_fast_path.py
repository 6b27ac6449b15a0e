"""The fast path (static-cache decoder, uncaptured on CPU; on-device patches) equals the reference path."""


import pytest
import torch
from docmaker import make_pdf, make_tiff
from typer.testing import CliRunner
from zoomkit import check_decode_step_is_one_graph, threshold_between, trained_adapter

from qzoom_cli.budget import VisualBudget
from qzoom_cli.cli import app
from qzoom_cli.decode import EagerDecoder
from qzoom_cli.documents import open_document
from qzoom_cli.runtime import resolve_decoder, resolve_runtime
from qzoom_cli.static_decode import BUCKET, StaticDecoder
from qzoom_cli.zoom.pipeline import ZoomEngine, ZoomSettings

QUESTIONS = ["What is the total due?", "Date?", "Which company issued this invoice, and to whom is it addressed?"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def pages(qz):
    with open_document(make_pdf(1), dpi=72) as pdf, open_document(make_tiff([(300, 160), (120, 260)])) as tiff:
        yield [qz._encode_page(pdf, 1, VisualBudget(16, 80)).view, qz._encode_page(tiff, 1, VisualBudget(16, 64)).view,
               qz._encode_page(tiff, 2, VisualBudget(8, 40)).view]


def _items(pages):
    return [(page, question) for page in pages for question in QUESTIONS[:2]] + [(pages[0], QUESTIONS[2])]


def _engines(bb, adapter=None, capture=False):
    eager = ZoomEngine(bb, 2, 2, adapter, decode=EagerDecoder(bb))
    fast = ZoomEngine(bb, 2, 2, adapter, decode=StaticDecoder(bb, capture=capture))
    return eager, fast


def _same(eager, fast):
    assert fast.generation.token_ids == eager.generation.token_ids
    assert fast.generation.finished == eager.generation.finished
    assert fast.generation.logprobs == pytest.approx(eager.generation.logprobs, abs=1e-4)
    assert fast.trace.region == eager.trace.region


@pytest.mark.parametrize("mode", ["never", "always"])
def test_static_decoder_equals_eager_single_and_batch(qz, pages, mode):
    eager, fast = _engines(qz.backbone)
    settings = ZoomSettings(mode)
    items = _items(pages)
    singles = [eager.answer(page, text, settings, 6) for page, text in items]
    assert any(a.trace.zoomed for a in singles) == (mode == "always")
    for single, batched in zip(singles, fast.answer_batch(items, settings, 6), strict=True):
        _same(single, batched)
    for (page, text), single in zip(items, singles, strict=True):
        _same(single, fast.answer(page, text, settings, 6))


def test_static_decoder_equals_eager_with_mixed_gate_decisions(qz, pages):
    """Part of the batch skips (direct group), part zooms (fused group): both groups decode statically."""
    adapter = trained_adapter(qz.backbone, seed=3)
    eager, fast = _engines(qz.backbone, adapter)
    items = _items(pages)
    scores = [eager.answer(page, text, ZoomSettings("auto", gate_threshold=0.0), 1).trace.gate.score
              for page, text in items]
    settings = ZoomSettings("auto", gate_threshold=threshold_between(scores), roi_threshold=0.3)
    expected = eager.answer_batch(items, settings, 6)
    assert 0 < sum(a.trace.zoomed for a in expected) < len(items)
    for want, got in zip(expected, fast.answer_batch(items, settings, 6), strict=True):
        _same(want, got)


def test_inductor_fused_step_equals_eager(qz, pages):
    """`--compile max`: the same step compiled by torch.compile (inductor), still the eager tokens."""
    bb = qz.backbone
    eager = ZoomEngine(bb, 2, 2, decode=EagerDecoder(bb))
    fused = ZoomEngine(bb, 2, 2, decode=StaticDecoder(bb, capture=False, fuse=True))
    assert fused.decode.name == "static_cache+inductor"
    items, settings = _items(pages)[:3], ZoomSettings("always")
    for want, got in zip(eager.answer_batch(items, settings, 5), fused.answer_batch(items, settings, 5), strict=True):
        _same(want, got)


@pytest.mark.graphs
def test_the_decode_step_is_one_graph(qz, pages):
    check_decode_step_is_one_graph(qz.backbone, _items(pages)[:3], ZoomSettings("always"))


def test_inductor_options_reach_the_compiler(qz):
    """The benchmarks' inductor settings are torch.compile's own: an unknown one is refused there."""
    with pytest.raises(RuntimeError, match="Unexpected optimization option no_such_option"):
        StaticDecoder(qz.backbone, capture=False, fuse=True, inductor_options={"no_such_option": 1})


def test_samples_ending_at_different_steps(qz, pages, monkeypatch):
    """An end token that one sample produces early and another later (or never): each answer is cut
    at its own end, the rest keep decoding, and the loop stops once all have ended."""
    bb = qz.backbone
    eager, fast = _engines(bb)
    items = _items(pages)
    settings = ZoomSettings("never")
    free = eager.answer_batch(items, settings, 8)
    end = free[0].generation.token_ids[2]
    monkeypatch.setattr(type(bb), "eos_token_ids", property(lambda self: [end]))
    expected = eager.answer_batch(items, settings, 8)
    lengths = {len(a.generation.token_ids) for a in expected}
    assert len(lengths) > 1 and expected[0].generation.finished and len(expected[0].generation.token_ids) == 3
    for want, got in zip(expected, fast.answer_batch(items, settings, 8), strict=True):
        _same(want, got)
    single = fast.answer(*items[0], settings, 8)
    assert single.generation.token_ids == free[0].generation.token_ids[:3] and single.generation.finished


def test_sessions_are_reused_across_prompts_of_one_bucket(qz, pages):
    """A second prompt of another length in the same cache bucket runs on the first one's buffers
    (stale slots from the longer prompt stay masked) and still equals the eager loop."""
    eager, fast = _engines(qz.backbone)
    settings = ZoomSettings("never")
    long_first = sorted(_items(pages), key=lambda item: -len(item[1]) - item[0].grid[0] * item[0].grid[1])
    for page, text in long_first:
        _same(eager.answer(page, text, settings, 5), fast.answer(page, text, settings, 5))
    assert len(fast.decode.sessions) < len(long_first)
    assert all(key[1] % BUCKET == 0 for key in fast.decode.sessions)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_graph_equals_eager_on_cuda(tiny_dir):
    from qzoom_cli import QZoom

    eager = QZoom.from_pretrained(str(tiny_dir), device="cuda", dtype="fp32", compile="off")
    fast = QZoom.from_pretrained(str(tiny_dir), device="cuda", dtype="fp32", compile="auto")
    assert fast.engine.decode.name == "cuda_graphs"
    for mode in ("never", "always"):
        a = eager.ask(make_pdf(2), QUESTIONS, budget=VisualBudget(16, 80), dpi=72, zoom=mode, max_new_tokens=6,
                      batch_size=2)
        b = fast.ask(make_pdf(2), QUESTIONS, budget=VisualBudget(16, 80), dpi=72, zoom=mode, max_new_tokens=6,
                     batch_size=2)
        for x, y in zip(a, b, strict=True):
            assert (x.answer, x.status, x.page) == (y.answer, y.status, y.page)
            assert [c.score for c in x.candidates] == pytest.approx([c.score for c in y.candidates], abs=1e-4)


def test_decoder_choice_and_fallback_notes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_decoder("auto", cpu, "sdpa") == ("eager", None)
    assert resolve_decoder("off", cuda, "sdpa") == ("eager", None)
    assert resolve_decoder("auto", cuda, "sdpa") == ("cuda_graphs", None)
    kind, note = resolve_decoder("on", cpu, "sdpa")
    assert kind == "static_cache" and "CUDA graphs need a CUDA device" in note
    kind, note = resolve_decoder("auto", cuda, "eager")
    assert kind == "eager" and "needs --attn sdpa" in note
    runtime = resolve_runtime("cpu", compile="on")
    assert (runtime.decoder, runtime.attn) == ("static_cache", "sdpa") and runtime.notes
    assert resolve_decoder("max", cuda, "sdpa") == ("cuda_graphs+inductor", None)
    assert resolve_decoder("max", cpu, "sdpa")[0] == "static_cache+inductor"


def test_cli_warns_when_the_fast_path_cannot_run(tiny_dir, tmp_path):
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(1))
    args = ["ask", str(pdf), "Total?", "--model", str(tiny_dir), "--device", "cpu", "--dpi", "72",
            "--max-visual-tokens", "64", "--max-new-tokens", "3", "--json"]
    result = CliRunner().invoke(app, args + ["--compile", "on"])
    assert result.exit_code == 0, result.output
    assert "qzoom: warning: CUDA graphs need a CUDA device" in result.stderr
    assert '"decoder": "static_cache"' in result.stdout
    plain = CliRunner().invoke(app, args + ["--compile", "off"])
    assert "CUDA graphs" not in plain.stderr and '"decoder": "eager"' in plain.stdout
    bad = CliRunner().invoke(app, args + ["--compile", "sometimes"])
    assert bad.exit_code == 2 and "unknown --compile" in bad.stderr


@pytest.mark.parametrize("size", [(56, 56), (168, 280), (28 * 7, 28 * 3)])
def test_device_patches_equal_the_image_processor(qz, size):
    """The on-device normalise + patchify (used on CUDA) is the processor's output bit for bit."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from qzoom_cli.backbones.qwen2_5_vl import pixel_patches

    generator = torch.Generator().manual_seed(size[0])
    pixels = torch.randint(0, 256, (size[0], size[1], 3), generator=generator, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    processor = Qwen2VLImageProcessorPil.from_dict(qz.backbone.image_processor.to_dict())
    expected = processor(images=[image], do_resize=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_patches(image, processor, torch.device("cpu")), expected)


def test_windowed_vision_attention_equals_one_call_per_window(qz):
    """The GPU's one-call windowed attention gives the stock per-window sdpa loop's page features."""
    from PIL import Image

    from qzoom_cli.backbones.attention import WINDOWED_SDPA

    bb = qz.backbone
    generator = torch.Generator().manual_seed(1)
    image = Image.fromarray(torch.randint(0, 256, (28 * 9, 28 * 13, 3), generator=generator,
                                          dtype=torch.uint8).numpy())
    vision = bb.config.vision_config
    assert vision._attn_implementation == "sdpa"
    expected = bb.encode_image(image)
    try:
        vision._attn_implementation = WINDOWED_SDPA
        windowed = bb.encode_image(image)
    finally:
        vision._attn_implementation = "sdpa"
    torch.testing.assert_close(windowed.features, expected.features, rtol=1e-5, atol=1e-5)
