"""The zoom engine on the tiny model: exactness of every shortcut it takes, and both checkpoint layouts."""

import json
import math
import re

import pytest
import torch
from docmaker import make_pdf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from zoomkit import assert_region_maps_of_a_padded_batch_equal_each_alone, trained_adapter, write_official_checkpoint

from qzoom_cli import QZoom
from qzoom_cli.api import zoom_info
from qzoom_cli.backbones.caches import CacheMark
from qzoom_cli.budget import VisualBudget
from qzoom_cli.decode import greedy_decode, prefill
from qzoom_cli.documents import open_document
from qzoom_cli.errors import ModelError, UsageError
from qzoom_cli.zoom.adapter import ADAPTER_WEIGHTS, AdapterConfig, ZoomAdapter
from qzoom_cli.zoom.fuse import fuse_region
from qzoom_cli.zoom.geometry import Box, grid_box_to_pixels
from qzoom_cli.zoom.pipeline import ZoomEngine, ZoomSettings
from qzoom_cli.zoom.region import RegionHead, region_logits

BUDGET = VisualBudget(16, 80)
QUESTION = "What is the total due?\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def page(qz):
    doc = open_document(make_pdf(1), dpi=72)
    yield qz._encode_page(doc, 1, BUDGET).view
    doc.close()


def _coarse(bb, page, text=QUESTION):
    prompt = bb.build_prompt(text, [page.grid])
    inputs = bb.prepare_inputs(prompt, [page.encoding])
    return prompt, inputs.embeds, inputs.positions


def _hand_region_logits(bb, layer, hidden, positions, block):
    """q.k/sqrt(d) of the last token against the image tokens, from the layer's weights by hand."""
    cfg = bb.text_config
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = hidden[0].float()
    norm = layer.input_layernorm
    x = norm.weight.float() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    attn = layer.self_attn
    q = (x @ attn.q_proj.weight.float().T + attn.q_proj.bias.float()).view(-1, heads, dim)
    k = (x @ attn.k_proj.weight.float().T + attn.k_proj.bias.float()).view(-1, kv_heads, dim)
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    axis = [a for a, n in enumerate(cfg.rope_parameters["mrope_section"]) for _ in range(n)]
    angles = torch.stack([positions[axis[i], 0].float() * inv_freq[i] for i in range(dim // 2)], dim=-1)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rotate(t):
        return torch.cat([-t[..., dim // 2:], t[..., :dim // 2]], dim=-1)

    q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
    group = heads // kv_heads
    per_head = torch.stack([k[block.start:block.stop, h // group] @ q[-1, h] for h in range(heads)]) / math.sqrt(dim)
    return per_head.mean(0).view(block.rows, block.cols)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_base_layer_region_head_scores_the_base_attention_logits(qz, page, depth):
    bb = qz.backbone
    prompt, embeds, positions = _coarse(bb, page)
    k = 1
    with torch.no_grad():
        hidden_k = bb.run_layers(embeds, positions, None, 0, k)
        layers = list(bb.decoder_layers[k:k + depth])
        [got] = [m.logits for m in region_logits(bb, RegionHead(layers), hidden_k, positions, [prompt.images[0]])]
        hidden = bb.run_layers(hidden_k, positions, None, k, k + depth - 1)
        expected = _hand_region_logits(bb, layers[-1], hidden, positions, prompt.images[0])
        copied = ZoomAdapter.initialized_from_base(AdapterConfig(k, depth, gate=False), bb)
        [from_copy] = [m.logits for m in region_logits(bb, copied.region(), hidden_k, positions,
                                                       [prompt.images[0]])]
    assert got.shape == (page.grid[0], page.grid[1])
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got, from_copy)  # shared base layers and copies score alike


def test_a_region_head_reads_a_left_padded_batch_as_each_sample_alone(qz, page):
    assert_region_maps_of_a_padded_batch_equal_each_alone(qz.backbone, page)


@pytest.mark.parametrize("aligned", [False, True])
def test_fused_prefill_with_cache_reuse_equals_prefill_from_scratch(qz, page, aligned):
    """Reusing the coarse prefix (cache + layer-K states) gives the logits of a full fused prefill
    to 1e-4 (float32), and then the same greedy tokens."""
    bb = qz.backbone
    engine = ZoomEngine(bb, 2, 2)
    prompt, embeds, positions = _coarse(bb, page)
    cache = bb.new_cache()
    with torch.no_grad():
        hidden_k = bb.run_layers(embeds, positions, cache, 0, 2)
    box = Box(1, 2, 4, 5)
    px = grid_box_to_pixels(box, page.grid, page.size, 28)
    region = bb.encode_image(page.crop(px, (3 * 28, 2 * 28)))
    fused = fuse_region(bb, QUESTION, prompt, page.encoding, region, box, aligned=aligned)
    reused, fused_positions, mask = engine.fused_prefill([fused], hidden_k, positions,
                                                         torch.ones(1, fused.reused, dtype=torch.long), cache,
                                                         CacheMark(fused.reused))
    assert mask is None and torch.equal(fused_positions, fused.inputs.positions)
    fresh = bb.new_cache()
    scratch = prefill(bb, fused.inputs.embeds, fused.inputs.positions, fresh)
    assert torch.allclose(reused, scratch, atol=1e-4)
    assert all(cache.layers[i].get_seq_length() == fused.prompt.length for i in range(bb.num_layers))
    ours = greedy_decode(bb, reused, cache, fused.inputs.positions, 6).token_ids
    assert ours == greedy_decode(bb, scratch, fresh, fused.inputs.positions, 6).token_ids


def test_never_mode_equals_stock_generate(qz, page):
    bb = qz.backbone
    answer = qz.engine.answer(page, QUESTION, ZoomSettings("never"), 8)
    prompt, _, _ = _coarse(bb, page)
    pixels = torch.cat([p for p in [bb.image_processor(images=[page.crop(Box(0, 0, *page.size),
                                                                          (page.grid[1] * 28, page.grid[0] * 28))],
                                                        do_resize=False, return_tensors="pt")["pixel_values"]]])
    ids = prompt.input_ids
    stock = bb.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                              image_grid_thw=torch.tensor([[1, page.grid[0] * 2, page.grid[1] * 2]]),
                              mm_token_type_ids=(ids == bb.config.image_token_id).int(), max_new_tokens=8,
                              do_sample=False)
    assert answer.generation.token_ids == stock[0, ids.shape[1]:].tolist()
    assert answer.trace.mode == "never" and answer.trace.region_head is None


def test_skip_path_equals_never_and_explain_reports_it(qz, page):
    """A skipped zoom is the plain answer: the coarse prefill split at layer K changes nothing."""
    bb = qz.backbone
    engine = ZoomEngine(bb, 2, 2, trained_adapter(bb))
    never = engine.answer(page, QUESTION, ZoomSettings("never"), 8).generation.token_ids
    skipped = engine.answer(page, QUESTION, ZoomSettings("auto", gate_threshold=1.01), 8)
    assert skipped.trace.skipped_reason == "gate score below threshold" and not skipped.trace.zoomed
    assert 0 <= skipped.trace.gate.score <= 1 and skipped.generation.token_ids == never
    zoomed = engine.answer(page, QUESTION, ZoomSettings("always", roi_threshold=0.0, explain=True), 8)
    assert zoomed.trace.zoomed and zoomed.trace.gate is None  # always: the gate is not consulted
    assert zoomed.direct.token_ids == never
    assert zoomed.region_tokens > 0 and zoomed.prompt_tokens == len(_coarse(bb, page)[0].input_ids[0]) \
        + zoomed.region_tokens + 2


def test_gate_decides_in_auto_mode(qz, page):
    engine = ZoomEngine(qz.backbone, 2, 2, trained_adapter(qz.backbone))
    on = engine.answer(page, QUESTION, ZoomSettings("auto", gate_threshold=0.0, roi_threshold=0.0), 4)
    assert on.trace.zoomed and on.trace.gate.kind == "trained" and on.trace.region_head == "trained"
    roi = zoom_info(on.trace, page).roi
    width, height = page.size
    assert roi["coord_space"] == "page_px@72dpi" and roi["grid"] == list(page.grid)
    assert 0 <= roi["bbox_xyxy"][0] < roi["bbox_xyxy"][2] <= width and 0 <= roi["bbox_xyxy"][1] < roi["bbox_xyxy"][3] <= height
    assert on.baseline_tokens >= on.coarse_tokens and on.time.gate_s > 0 and on.time.fused_prefill_s > 0
    empty = engine.answer(page, QUESTION, ZoomSettings("always", roi_threshold=1.0), 4)
    assert not empty.trace.zoomed and empty.trace.skipped_reason == "no region above the region threshold"


def test_training_free_auto_uses_attention_lift(qz, page):
    engine = ZoomEngine(qz.backbone, 2, 2)
    low = engine.answer(page, QUESTION, ZoomSettings("auto", gate_threshold=0.0), 4)
    high = engine.answer(page, QUESTION, ZoomSettings("auto", gate_threshold=1e9), 4)
    assert low.trace.gate.kind == high.trace.gate.kind == "attention_lift"
    assert low.trace.zoomed and low.trace.region_head == "base_layers" and not high.trace.zoomed
    assert low.trace.gate.score == high.trace.gate.score >= 1.0


def test_aligned_positions_reach_the_model(qz, page):
    bb = qz.backbone
    settings = ZoomSettings("always", roi_threshold=0.0)
    plain = ZoomEngine(bb, 2, 2, trained_adapter(bb)).answer(page, QUESTION, settings, 6)
    aligned = ZoomEngine(bb, 2, 2, trained_adapter(bb, reuse_src_pos=True), reuse_src_pos=True).answer(
        page, QUESTION, settings, 6)
    assert (plain.trace.region.positions, aligned.trace.region.positions) == ("second_image", "aligned")
    assert plain.generation.logprobs != aligned.generation.logprobs


def test_official_layout_and_adapter_layout_give_identical_outputs(qz, tiny_dir, tmp_path):
    adapter = trained_adapter(qz.backbone, branch_layer=2, depth=2)
    adapter.save_pretrained(tmp_path / "adapter")
    write_official_checkpoint(tiny_dir, adapter, tmp_path / "official")
    ours = QZoom.from_pretrained(str(tiny_dir), adapter=tmp_path / "adapter", device="cpu")
    official = QZoom.from_pretrained(str(tmp_path / "official"), device="cpu")
    base, loaded = qz.backbone.model.state_dict(), official.backbone.model.state_dict()
    assert base.keys() == loaded.keys() and all(torch.equal(base[k], loaded[k]) for k in base)
    assert official.adapter is not None and official.adapter.config.gate
    for settings in (ZoomSettings("auto"), ZoomSettings("auto", gate_threshold=0.0, roi_threshold=0.0)):
        a, b = (m.ask(make_pdf(2), "total?", budget=BUDGET, zoom=settings, max_new_tokens=4, dpi=72)[0]
                for m in (ours, official))
        assert (a.answer, a.page, a.zoom.gate, a.zoom.roi) == (b.answer, b.page, b.zoom.gate, b.zoom.roi)
        assert [c.answer for c in a.candidates] == [c.answer for c in b.candidates]
        # equal weights, but loaded at different memory alignments: CPU kernels may round the
        # last float32 bit differently, nothing more
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-5)


def test_adapter_round_trip_and_strict_loading(qz, tmp_path):
    bb = qz.backbone
    adapter = trained_adapter(bb)
    folder = tmp_path / "runs" / "new" / "a"
    adapter.save_pretrained(folder)  # folders made as needed
    text = (folder / "qzoom_config.json").read_text()
    assert text.startswith('{\n  "format": "qzoom.adapter/v1",\n  "branch_layer": 2,\n')  # for people to read
    config = json.loads(text)
    assert config["format"] == "qzoom.adapter/v1" and config["branch_layer"] == 2 and config["depth"] == 2
    with safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as weights:
        assert weights.metadata() == {"format": "qzoom.adapter/v1"}  # the weights say what they are too
    again = ZoomAdapter.from_pretrained(folder, bb)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in adapter.state_dict().items())

    weights = load_file(folder / ADAPTER_WEIGHTS)
    weights.pop("high_res_head.bias")
    save_file(weights, folder / ADAPTER_WEIGHTS)
    with pytest.raises(ModelError, match="missing 1"):
        ZoomAdapter.from_pretrained(folder, bb)
    weights["high_res_head.bias"] = torch.zeros(1)
    weights["twig_layers.7.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(weights, folder / ADAPTER_WEIGHTS)
    with pytest.raises(ModelError, match="unexpected 1"):
        ZoomAdapter.from_pretrained(folder, bb)
    with pytest.raises(ModelError, match="does not fit"):
        ZoomAdapter(AdapterConfig(branch_layer=3, depth=2), bb)
    with pytest.raises(ModelError, match="hidden size"):
        ZoomAdapter(AdapterConfig(branch_layer=1, depth=1, hidden_size=999), bb)


def test_official_checkpoint_with_missing_modules_is_refused(qz, tiny_dir, tmp_path):
    adapter = trained_adapter(qz.backbone, gate=False)
    out = write_official_checkpoint(tiny_dir, adapter, tmp_path / "broken")
    config = json.loads((out / "config.json").read_text())
    config["enable_high_res"] = True  # claims a gate whose weights are not there
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"zoom weights in {re.escape(str(out))} do not match .*: missing"):
        QZoom.from_pretrained(str(out), device="cpu")


def test_bad_zoom_mode():
    with pytest.raises(UsageError):
        ZoomSettings("sometimes")


def test_card_can_take_the_processor_from_the_base_repo(qz, tiny_dir, tmp_path, monkeypatch):
    from qzoom_cli import api
    from qzoom_cli.cards import ModelCard
    out = write_official_checkpoint(tiny_dir, trained_adapter(qz.backbone), tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        (out / name).unlink()
    with pytest.raises(ModelError, match="no tokenizer"):
        QZoom.from_pretrained(str(out), device="cpu")
    card = ModelCard(id=str(out), family="qwen2_5_vl", patch_factor=28, min_visual_tokens=16, max_visual_tokens=80,
                     processor=str(tiny_dir), zoom={"gate_threshold": 0.5})
    monkeypatch.setattr(api, "find_card", lambda ref: card)
    loaded = QZoom.from_pretrained(str(out), device="cpu")
    assert loaded.engine.gate_threshold == 0.5  # a trained gate takes the card's threshold
    [result] = loaded.ask(make_pdf(1), "total?", max_new_tokens=2, dpi=72)
    assert result.budget.max_tokens == 576 and result.zoom.gate["kind"] == "trained"


def test_roi_native_never_upsamples_a_small_region(qz, page):
    engine = ZoomEngine(qz.backbone, 2, 2)
    small = Box(0, 0, 1, 1)  # one coarse cell: a few dozen page pixels a side
    px = grid_box_to_pixels(small, page.grid, page.size, 28)
    native = round(px.area / 28 ** 2)
    full = ZoomSettings("always", roi_threshold=0.0)
    assert full.region_budget(page.budget, native) == page.budget
    capped = ZoomSettings("always", region_native=True).region_budget(page.budget, native)
    assert capped.max_tokens == max(1, min(page.budget.max_tokens, native)) < page.budget.max_tokens
    answered = engine.answer(page, QUESTION, ZoomSettings("always", roi_threshold=0.0, region_native=True), 2)
    read = answered.trace.region
    assert answered.region_tokens <= max(1, round(read.page_box.area / 28 ** 2))
    assert read.max_tokens == max(1, min(page.budget.max_tokens, round(read.page_box.area / 28 ** 2)))


def test_damaged_or_foreign_adapters_are_named(qz, tmp_path):
    import logging

    adapter = trained_adapter(qz.backbone)
    adapter.save_pretrained(tmp_path / "a")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("qzoom")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)  # a CLI test run before may have quietened it
    try:
        ZoomAdapter.from_pretrained(tmp_path / "a", qz.backbone)
        assert not records
        config = json.loads((tmp_path / "a" / "qzoom_config.json").read_text())
        (tmp_path / "a" / "qzoom_config.json").write_text(json.dumps({**config, "base_model": "someone/other-vl"}))
        ZoomAdapter.from_pretrained(tmp_path / "a", qz.backbone)
        assert records[0].getMessage() == (f"the adapter was trained on someone/other-vl, not on "
                                           f"{qz.backbone.model_id}: its regions and gate may not fit this model")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    weights = tmp_path / "a" / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="is damaged"):
        ZoomAdapter.from_pretrained(tmp_path / "a", qz.backbone)
    (tmp_path / "a" / "qzoom_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ZoomAdapter.from_pretrained(tmp_path / "a", qz.backbone)


def test_the_record_states_the_region_budget_that_was_used(qz):
    """With --roi-native the record's roi_max_tokens is the cap the region was read under, not the page's."""
    settings = ZoomSettings("always", roi_threshold=0.95, region_native=True)  # the peak cells: a small region
    [result] = qz.ask(make_pdf(1), "total?", zoom=settings, max_new_tokens=2, dpi=72, budget=BUDGET)
    assert result.zoom.zoomed
    x0, y0, x1, y1 = result.zoom.roi["bbox_xyxy"]
    native = round((x1 - x0) * (y1 - y0) / 28 ** 2)
    assert result.budget.roi_max_tokens == max(1, min(BUDGET.max_tokens, native)) < BUDGET.max_tokens
    assert result.budget.roi_tokens <= result.budget.roi_max_tokens



def _hub_cache(root, repo, files: dict[str, bytes]):
    """A Hugging Face cache holding `repo` at one snapshot, as `hf download` leaves it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def test_checkpoint_weights_are_found_in_the_hub_cache_offline(tmp_path, monkeypatch):
    """A cached hub id: the shards its index names (each once), a single file without an index, and
    a named error when neither is cached."""
    from huggingface_hub import constants

    from qzoom_cli.errors import ModelNotAvailable
    from qzoom_cli.zoom.adapter import checkpoint_files

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    index = {"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                            "c": "model-00002-of-00002.safetensors"}}
    sharded = _hub_cache(tmp_path, "org/sharded", {"model.safetensors.index.json": json.dumps(index).encode(),
                                                   "model-00001-of-00002.safetensors": b"1",
                                                   "model-00002-of-00002.safetensors": b"2",
                                                   "unrelated.safetensors": b"3"})
    found = checkpoint_files("org/sharded", None)
    assert [p.name for p in found] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert all(p.parent == sharded for p in found)
    single = _hub_cache(tmp_path, "org/single", {"model.safetensors": b"1"})
    assert checkpoint_files("org/single", None) == [single / "model.safetensors"]
    pinned = sharded.parent / ("f" * 40)  # an older snapshot, asked for by its commit, sharded its own way
    pinned.mkdir()
    (pinned / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "older.safetensors"}}))
    (pinned / "older.safetensors").write_bytes(b"0")
    assert checkpoint_files("org/sharded", "f" * 40) == [pinned / "older.safetensors"]
    assert checkpoint_files("org/single", "0123456789abcdef0123456789abcdef01234567") == [single / "model.safetensors"]
    with pytest.raises(ModelNotAvailable):  # a pinned revision that is not cached is not the cached one
        checkpoint_files("org/single", "v2")
    _hub_cache(tmp_path, "org/empty", {"config.json": b"{}"})
    with pytest.raises(ModelNotAvailable, match="cannot find the safetensors weights of org/empty"):
        checkpoint_files("org/empty", None)


@pytest.mark.parametrize("content, message", [
    ('{"branch_layer": 2, "depth": 2}', "is not a qzoom adapter config (qzoom.adapter/v1)"),   # no format
    ('{"format": "other/v9", "branch_layer": 2}', "is not a qzoom adapter config (qzoom.adapter/v1)"),
    ('[1, 2]', "is not a qzoom adapter config (qzoom.adapter/v1)"),
    ('{"format": "qzoom.adapter/v1", "colour": "red"}', "unexpected keyword argument 'colour'"),
    ("{not json", "is not valid JSON"),
])
def test_an_adapter_config_that_is_not_one_says_so(tmp_path, content, message):
    from qzoom_cli.zoom.adapter import AdapterConfig

    path = tmp_path / "qzoom_config.json"
    path.write_text(content)
    with pytest.raises(ModelError) as refused:
        AdapterConfig.from_file(path)
    assert refused.value.message.startswith(str(path)) and message in refused.value.message


def test_a_stage_clock_splits_each_block_evenly_among_the_rows_taking_part():
    """A batch's stage times are shared out, so summing a stage over its rows gives the wall time."""
    from qzoom_cli.results import Timings
    from qzoom_cli.zoom.pipeline import _Clock

    ticks = iter([10.0, 13.0, 20.0, 21.0, 30.0, 32.0])
    timings = [Timings() for _ in range(3)]
    clock = _Clock(timings, torch.device("cpu"), now=lambda: next(ticks))
    with clock("coarse_prefill_s", [0, 2]):
        pass
    with clock("coarse_prefill_s", [0]):
        pass
    with clock("gate_s", [0, 1]):
        pass
    assert [(t.coarse_prefill_s, t.gate_s) for t in timings] == [(2.5, 1.0), (0.0, 1.0), (1.5, 0.0)]


@pytest.mark.parametrize("modules, gate_default, roi_default, head", [
    (None, "LIFT_THRESHOLD", "RELATIVE_ROI_THRESHOLD", "base_layers"),
    ({"gate": True, "region_head": True}, "TRAINED_GATE_THRESHOLD", "TRAINED_ROI_THRESHOLD", "trained"),
    ({"gate": True, "region_head": False}, "TRAINED_GATE_THRESHOLD", "RELATIVE_ROI_THRESHOLD", "base_layers"),
    ({"gate": False, "region_head": True}, "LIFT_THRESHOLD", "TRAINED_ROI_THRESHOLD", "trained"),
])
def test_default_thresholds_follow_the_modules_the_adapter_has(qz, modules, gate_default, roi_default, head):
    """A trained gate's probability and a trained head's sigmoid map have their own scales; without
    them the lift and the relative map have theirs. Thresholds given explicitly always win."""
    from qzoom_cli import options

    adapter = trained_adapter(qz.backbone, **modules) if modules else None
    engine = ZoomEngine(qz.backbone, 2, 2, adapter=adapter)
    assert (engine.gate_threshold, engine.roi_threshold, engine.region_head) == \
        (getattr(options, gate_default), getattr(options, roi_default), head)
    assert engine.has_gate == bool(modules and modules["gate"])
    chosen = ZoomEngine(qz.backbone, 2, 2, adapter=adapter, gate_threshold=0.3, roi_threshold=0.7)
    assert (chosen.gate_threshold, chosen.roi_threshold) == (0.3, 0.7)


def test_an_adapter_is_built_like_the_base_layers_it_branches_from(qz, tiny_dir, tmp_path):
    """Branch layers sit at base indices K..K+T-1 (their attention kind and cache slot), and every
    module takes the model's device and dtype: a bf16 model loads an adapter and zooms in bf16."""
    adapter = trained_adapter(qz.backbone, branch_layer=1, depth=2)
    for layers in (adapter.twig_layers, adapter.high_res_layers):
        assert [layer.self_attn.layer_idx for layer in layers] == [1, 2]
    assert adapter.high_res_head.weight.shape == (1, qz.backbone.hidden_size)  # one logit, as released checkpoints
    adapter.save_pretrained(tmp_path / "a")
    half = QZoom.from_pretrained(str(tiny_dir), adapter=str(tmp_path / "a"), device="cpu", dtype="bf16")
    assert {p.dtype for p in half.adapter.parameters()} == {torch.bfloat16}
    with open_document(make_pdf(1), dpi=72) as doc:
        view = half._encode_page(doc, 1, BUDGET).view
        answer = half.engine.answer(view, QUESTION, ZoomSettings("auto", gate_threshold=0.0, roi_threshold=0.0), 2)
    assert answer.trace.gate.kind == "trained" and answer.trace.zoomed
