"""Qwen3-VL (dense and MoE) on tiny checkpoints: the same exactness as Qwen2.5-VL, deepstack included."""

import json
import math

import pytest
import torch
from docmaker import make_pdf
from PIL import Image
from typer.testing import CliRunner
from zoomkit import (
    assert_region_maps_of_a_padded_batch_equal_each_alone,
    check_batch_equals_single,
    check_static_decoder_equals_eager,
    check_train_run_eval_bench,
    trained_adapter,
    write_official_checkpoint,
)

from qzoom_cli import QZoom, cli
from qzoom_cli.backbones.caches import CacheMark
from qzoom_cli.budget import VisualBudget
from qzoom_cli.decode import Generation, greedy_decode, prefill
from qzoom_cli.documents import open_document
from qzoom_cli.testing import make_tiny
from qzoom_cli.zoom.fuse import fuse_region
from qzoom_cli.zoom.geometry import Box, grid_box_to_pixels
from qzoom_cli.zoom.pipeline import ZoomEngine, ZoomSettings
from qzoom_cli.zoom.region import RegionHead, first_token_keep, region_logits

BUDGET = VisualBudget(12, 48)
QUESTION = "What is the total due?\nAnswer the question using a single word or phrase."
runner = CliRunner()


@pytest.fixture(scope="session", params=["qwen3_vl", "qwen3_vl_moe"])
def qwen3_dir(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(request.param) / request.param, family=request.param)


@pytest.fixture(scope="session")
def qz3(qwen3_dir):
    return QZoom.from_pretrained(str(qwen3_dir), device="cpu")


@pytest.fixture(scope="module")
def page(qz3):
    with open_document(make_pdf(1), dpi=72) as doc:
        yield qz3._encode_page(doc, 1, BUDGET).view


def _region_image(page_image, bb):
    crop = page_image.crop((40, 60, 300, 200))
    return crop.resize(bb.grid_pixels((3, 5)), Image.Resampling.BICUBIC)


def test_layout_and_checkpoint_family(qz3):
    layout = qz3.backbone.layout
    assert (layout.patch_factor, layout.addition_layers, layout.attention_sink) == (32, 3, "first_token")
    assert layout.min_region_side == 28 and layout.spatial_rows == (1, 2)
    assert qz3.model_info().family == qz3.backbone.family
    assert qz3.backbone.system_prompt == "You are a helpful assistant."
    text = qz3.backbone.tokenizer.decode(qz3.backbone.build_prompt("q", [(2, 2)]).input_ids[0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


def test_never_mode_equals_stock_generate(qz3, page, page_image):
    bb = qz3.backbone
    answer = qz3.engine.answer(page, QUESTION, ZoomSettings("never"), 8)
    prompt = bb.build_prompt(QUESTION, [page.grid])
    stock = bb.model.generate(**bb.stock_inputs(prompt, [bb.fit_image(page_image, BUDGET)]), max_new_tokens=8,
                              do_sample=False)
    assert answer.generation.token_ids == stock[0, prompt.length:].tolist()


def test_layer_by_layer_forward_equals_stock_logits_with_two_images(qz3, page_image):
    """Our embeddings, positions and deepstack additions through our layer loop give the stock
    forward's logits; leaving the additions out does not (the test can tell)."""
    bb = qz3.backbone
    images = [bb.fit_image(page_image, BUDGET), _region_image(page_image, bb)]
    encodings = [bb.encode_image(image) for image in images]
    prompt = bb.build_prompt(QUESTION, [e.grid for e in encodings])
    inputs = bb.prepare_inputs(prompt, encodings)
    with torch.no_grad():
        stock = bb.model(**bb.stock_inputs(prompt, images)).logits[0]
        expected_positions, _ = bb.model.model.get_rope_index(
            prompt.input_ids, mm_token_type_ids=(prompt.input_ids == bb.config.image_token_id).int(),
            image_grid_thw=torch.tensor([[1, r * 2, c * 2] for r, c in (e.grid for e in encodings)]))
        ours = bb.logits(bb.run_layers(inputs.embeds, inputs.positions, None, 0, bb.num_layers, None,
                                       inputs.additions))[0]
        plain = bb.logits(bb.run_layers(inputs.embeds, inputs.positions, None, 0, bb.num_layers))[0]
    assert torch.equal(inputs.positions, expected_positions)
    assert inputs.additions.levels == 3 and int(inputs.additions.mask.sum()) == sum(e.tokens for e in encodings)
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)
    assert (plain - stock).abs().max() > 1e-2


@pytest.mark.parametrize("branch_layer", [1, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_fused_prefill_with_cache_reuse_equals_prefill_from_scratch(qz3, page, page_image, aligned, branch_layer):
    """The replayed suffix gets the region's deepstack at the region's tokens only; with K below
    the deepstack layers, the upper layers add both images' levels over the fused sequence. Not
    aligned, the result is also the stock model's forward on the fused prompt."""
    bb = qz3.backbone
    engine = ZoomEngine(bb, branch_layer, 1)
    prompt = bb.build_prompt(QUESTION, [page.grid])
    inputs = bb.prepare_inputs(prompt, [page.encoding])
    cache = bb.new_cache()
    box = Box(1, 1, 4, 3)
    crop = page.crop(grid_box_to_pixels(box, page.grid, page.size, 28), bb.grid_pixels((2, 3)))
    region = bb.encode_image(crop)
    fused = fuse_region(bb, QUESTION, prompt, page.encoding, region, box, aligned=aligned)
    with torch.no_grad():
        hidden_k = bb.run_layers(inputs.embeds, inputs.positions, cache, 0, branch_layer, None, inputs.additions)
        reused, _, mask = engine.fused_prefill([fused], hidden_k, inputs.positions,
                                               torch.ones(1, fused.reused, dtype=torch.long), cache,
                                               CacheMark(fused.reused), inputs.additions)
        fresh = bb.new_cache()
        scratch = prefill(bb, fused.inputs.embeds, fused.inputs.positions, fresh, None, fused.inputs.additions)
        if not aligned:
            images = [bb.fit_image(page_image, BUDGET), crop]
            stock = bb.model(**bb.stock_inputs(fused.prompt, images)).logits[:, -1]
            torch.testing.assert_close(scratch, stock, atol=1e-4, rtol=1e-4)
    assert mask is None
    torch.testing.assert_close(reused, scratch, atol=1e-4, rtol=1e-4)
    assert greedy_decode(bb, reused, cache, fused.inputs.positions, 5).token_ids == \
        greedy_decode(bb, scratch, fresh, fused.inputs.positions, 5).token_ids


def test_the_engine_keeps_the_deepstack_additions_above_a_low_branch(qz3, page):
    """Branched below the layers that add the vision tower's deepstack features (K=1 < 3), the
    direct path's upper layers still add them (a skipped zoom is the plain answer), and the zoom
    path hands the page's additions to the fused prefill (its logits are the fused prompt's own)."""
    bb = qz3.backbone
    engine = ZoomEngine(bb, 1, 1)
    never = engine.answer(page, QUESTION, ZoomSettings("never"), 4).generation
    skipped = engine.answer(page, QUESTION, ZoomSettings("auto", gate_threshold=1e9), 4)
    assert not skipped.trace.zoomed and skipped.generation.token_ids == never.token_ids
    assert skipped.generation.logprobs == pytest.approx(never.logprobs, abs=1e-4)

    seen, fused_prefill = [], engine.fused_prefill

    def recorded(fused, *rest):
        seen.append((fused, fused_prefill(fused, *rest)))
        return seen[-1][1]

    engine.fused_prefill = recorded
    zoomed = engine.answer(page, QUESTION, ZoomSettings("always", roi_threshold=0.0), 4)
    [([fused], (reused, _, _))] = seen
    scratch = prefill(bb, fused.inputs.embeds, fused.inputs.positions, bb.new_cache(), None, fused.inputs.additions)
    assert zoomed.trace.zoomed
    torch.testing.assert_close(reused, scratch, atol=1e-4, rtol=1e-4)


def _rms(x, norm):
    return norm.weight.float() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def _hand_region(bb, layer, hidden, positions, block):
    """Last token's q.k/sqrt(d) against the image keys, and the first token's head-0 sink scores,
    from the layer's weights: RMS norm, projections, per-head q/k norms, interleaved M-RoPE."""
    cfg = bb.text_config
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = _rms(hidden[0].float(), layer.input_layernorm)
    attn = layer.self_attn
    q = _rms((x @ attn.q_proj.weight.float().T).view(-1, heads, dim), attn.q_norm)
    k = _rms((x @ attn.k_proj.weight.float().T).view(-1, kv_heads, dim), attn.k_norm)
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    section = cfg.rope_parameters["mrope_section"]

    def axis(i):  # t, h, w interleaved: h on i = 1 mod 3, w on i = 2 mod 3, within their sections
        if i % 3 == 1 and i < 3 * section[1]:
            return 1
        return 2 if i % 3 == 2 and i < 3 * section[2] else 0

    angles = torch.stack([positions[axis(i), 0].float() * inv_freq[i] for i in range(dim // 2)], dim=-1)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rotate(t):
        return torch.cat([-t[..., dim // 2:], t[..., :dim // 2]], dim=-1)

    q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
    group = heads // kv_heads
    image_keys = [k[block.start:block.stop, h // group] for h in range(heads)]
    logits = torch.stack([image_keys[h] @ q[-1, h] for h in range(heads)]).mean(0) / math.sqrt(dim)
    sink = torch.stack([image_keys[h] @ q[0, 0] for h in range(heads)]).mean(0) / math.sqrt(dim)
    return logits.view(block.rows, block.cols), (torch.sigmoid(sink) < 0.75).view(block.rows, block.cols)


def test_region_head_equals_a_hand_computation(qz3, page):
    bb = qz3.backbone
    prompt = bb.build_prompt(QUESTION, [page.grid])
    inputs = bb.prepare_inputs(prompt, [page.encoding])
    with torch.no_grad():
        hidden = bb.run_layers(inputs.embeds, inputs.positions, None, 0, 2, None, inputs.additions)
        [scores] = region_logits(bb, RegionHead([bb.decoder_layers[2]]), hidden, inputs.positions, [prompt.images[0]])
        logits, keep = _hand_region(bb, bb.decoder_layers[2], hidden, inputs.positions, prompt.images[0])
    torch.testing.assert_close(scores.logits, logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(scores.keep, keep)


def test_a_region_head_reads_a_left_padded_batch_as_each_sample_alone(qz3, page):
    assert_region_maps_of_a_padded_batch_equal_each_alone(qz3.backbone, page)


def test_first_token_sinks():
    query = torch.tensor([1.0, 0.0, 0.0, 0.0])
    keys = torch.zeros(2, 3, 4)
    keys[:, 1, 0] = 4.0   # sigmoid(4 / 2) = 0.88: a sink
    keys[0, 2, 0] = 4.0   # one head only: mean 1.0, sigmoid(1.0) = 0.73 stays
    assert first_token_keep(query, keys).tolist() == [True, False, True]


def test_official_layout_equals_the_same_adapter(qz3, qwen3_dir, tmp_path):
    bb = qz3.backbone
    adapter = trained_adapter(bb, branch_layer=2, depth=2, seed=5)
    adapter_dir = adapter.save_pretrained(tmp_path / "adapter")
    official = write_official_checkpoint(qwen3_dir, adapter, tmp_path / "official")
    from_official = QZoom.from_pretrained(str(official), device="cpu")
    from_adapter = QZoom.from_pretrained(str(qwen3_dir), adapter=str(adapter_dir), device="cpu")
    assert from_official.adapter.config.branch_layer == 2 and from_official.adapter.config.gate
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(from_official.adapter.state_dict()[key], tensor)
    settings = ZoomSettings("auto", gate_threshold=0.0, roi_threshold=0.3)
    ask = {"max_new_tokens": 4, "dpi": 72, "budget": BUDGET, "zoom": settings}
    [a] = from_official.ask(make_pdf(1), "total?", **ask)
    [b] = from_adapter.ask(make_pdf(1), "total?", **ask)
    assert (a.answer, a.zoom.gate, a.zoom.roi, a.stats.prompt_tokens) == (b.answer, b.zoom.gate, b.zoom.roi,
                                                                          b.stats.prompt_tokens)


@pytest.mark.parametrize("aligned", [False, True])
def test_batch_equals_single_runs(qz3, aligned):
    check_batch_equals_single(qz3, BUDGET, aligned)


def test_thinking_checkpoint_keeps_the_reasoning_apart(tmp_path):
    qz = QZoom.from_pretrained(str(make_tiny(tmp_path / "thinking", family="qwen3_vl", thinking=True)), device="cpu")
    bb = qz.backbone
    end = bb.tokenizer.convert_tokens_to_ids("</think>")
    assert bb.reasoning_end_id == end and qz.default_max_new_tokens() == 1024
    words = bb.tokenizer.encode(" total due", add_special_tokens=False)
    eos = bb.eos_token_ids[0]
    text, reasoning = qz._text(Generation(token_ids=[*words, end, *words, eos], finished=True))
    assert (text, reasoning) == ("total due", "total due")
    assert qz._text(Generation(token_ids=[*words], finished=False)) == ("", "total due")
    assert qz._text(Generation(token_ids=[*words, eos], finished=True)) == ("total due", None)
    [result] = qz.ask(make_pdf(1), "total?", max_new_tokens=3, dpi=72, budget=BUDGET, zoom="never")
    generated = result.stats.output_tokens
    assert generated == 3 and result.status == "truncated"
    if result.reasoning is not None:  # still reasoning when cut off: no answer yet, and the warning says so
        assert result.answer == "" and "still reasoning" in result.warnings[-1]
    stock = QZoom.from_pretrained(str(make_tiny(tmp_path / "instruct", family="qwen3_vl")), device="cpu")
    assert stock.backbone.reasoning_end_id is None and stock.default_max_new_tokens() == 64


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_text_config_as_a_plain_dict_loads_like_the_base_family(tmp_path, family):
    """ZwZ-style config.json (ZwZ-7B is Qwen2.5-VL, ZwZ-4B/8B Qwen3-VL): text fields at the top
    level too and `text_config` a bare dict (no model_type); it loads into the same family and
    answers the same."""
    base = make_tiny(tmp_path / "base", family=family)
    zwz = make_tiny(tmp_path / "zwz", family=family)
    config = json.loads((zwz / "config.json").read_text())
    text = {k: v for k, v in config["text_config"].items() if k not in ("model_type", "architectures")}
    config.update({k: v for k, v in text.items() if k not in config})
    config["text_config"] = text
    (zwz / "config.json").write_text(json.dumps(config))
    ask = {"max_new_tokens": 4, "dpi": 72, "budget": BUDGET, "zoom": "always"}
    [a] = QZoom.from_pretrained(str(base), device="cpu").ask(make_pdf(1), "total?", **ask)
    loaded = QZoom.from_pretrained(str(zwz), device="cpu")
    [b] = loaded.ask(make_pdf(1), "total?", **ask)
    assert loaded.backbone.family == family
    assert (a.answer, a.zoom.roi, a.stats.prompt_tokens) == (b.answer, b.zoom.roi, b.stats.prompt_tokens)


def test_make_tiny_command_families(tmp_path):
    result = runner.invoke(cli.app, ["models", "make-tiny", str(tmp_path / "moe"), "--family", "qwen3_vl", "--moe",
                                     "--layers", "2"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl_moe" and config["text_config"]["num_hidden_layers"] == 2
    bad = runner.invoke(cli.app, ["models", "make-tiny", str(tmp_path / "x"), "--family", "qwen2_5_vl", "--moe"])
    assert bad.exit_code == 2


def test_train_run_eval_bench_commands(qwen3_dir, tmp_path):
    """The commands work on Qwen3-VL: train rpn (teacher pass included) -> train gate -> run, eval, bench."""
    check_train_run_eval_bench(qwen3_dir, tmp_path)


@pytest.mark.parametrize("mode", ["never", "always"])
def test_static_decoder_equals_eager(qz3, page, mode):
    check_static_decoder_equals_eager(qz3.backbone, page, mode)


@pytest.mark.graphs
def test_the_decode_step_is_one_graph(qz3, page):
    from zoomkit import check_decode_step_is_one_graph

    check_decode_step_is_one_graph(qz3.backbone, [(page, "Total?"), (page, "Date?")], ZoomSettings("always"))


def test_training_answers_carry_deepstack_like_inference(qz3, page_image):
    """The gate's answer ladder (and the teacher's plain answer) feed the visual additions as `ask`
    does: each rung's answer is `ask --zoom never` at that budget."""
    from qzoom_cli.training.gate import answer_ladder

    ladder = (12, 24, 48)
    answers = answer_ladder(qz3.backbone, page_image, QUESTION, ladder, max_new_tokens=4)
    asked = [qz3.ask(page_image_bytes(page_image), "What is the total due?", zoom="never", max_new_tokens=4,
                     budget=VisualBudget(t, t))[0].answer for t in ladder]
    assert answers == asked


def page_image_bytes(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("aligned", [True, False])
def test_fine_tuning_input_scores_the_answer_as_decoding_reads_it(qz3, page, aligned):
    from zoomkit import check_teacher_forcing

    check_teacher_forcing(qz3, page, QUESTION, BUDGET, aligned)
