"""Qwen3.5 / Qwen3.6 (dense and MoE) on tiny hybrid checkpoints: linear-attention layers between
full-attention ones, with the exactness of the other families (stock generate(), cache reuse,
batches, the fast decoder)."""

import json

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
)

from qzoom_cli import QZoom, cli
from qzoom_cli.backbones.caches import CacheMark, recurrent_state
from qzoom_cli.budget import VisualBudget
from qzoom_cli.decode import Generation, greedy_decode, prefill, run_marked
from qzoom_cli.documents import open_document
from qzoom_cli.errors import AdapterMismatch, UsageError
from qzoom_cli.padding import pad_segments
from qzoom_cli.testing import make_tiny
from qzoom_cli.zoom.adapter import AdapterConfig, ZoomAdapter
from qzoom_cli.zoom.fuse import fuse_region
from qzoom_cli.zoom.geometry import Box, grid_box_to_pixels
from qzoom_cli.zoom.pipeline import ZoomEngine, ZoomSettings

BUDGET = VisualBudget(12, 48)
QUESTION = "What is the total due?\nAnswer the question using a single word or phrase."
runner = CliRunner()


@pytest.fixture(scope="session", params=["qwen3_5", "qwen3_5_moe"])
def hybrid_dir(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(request.param) / request.param, family=request.param)


@pytest.fixture(scope="session")
def qz5(hybrid_dir):
    return QZoom.from_pretrained(str(hybrid_dir), device="cpu")


@pytest.fixture(scope="module")
def page(qz5):
    with open_document(make_pdf(1), dpi=72) as doc:
        yield qz5._encode_page(doc, 1, BUDGET).view


def test_layout_prompt_and_layers(qz5):
    bb = qz5.backbone
    assert bb.text_config.layer_types == ["linear_attention", "full_attention"] * 2
    assert bb.key_layers == (1, 3) and bb.layout.addition_layers == 0 and bb.layout.patch_factor == 32
    assert bb.system_prompt is None and bb.reasoning_end_id is None and qz5.default_max_new_tokens() == 64
    text = bb.tokenizer.decode(bb.build_prompt("q", [(2, 2)]).input_ids[0])
    assert text.startswith("<|im_start|>user\n<|vision_start|>")  # no system turn
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # not thinking: an empty block
    assert (qz5.engine.branch_layer, qz5.engine.depth) == (3, 1)  # no card: the last head layer has keys


def test_never_mode_equals_stock_generate(qz5, page, page_image):
    bb = qz5.backbone
    answer = qz5.engine.answer(page, QUESTION, ZoomSettings("never"), 8)
    prompt = bb.build_prompt(QUESTION, [page.grid])
    stock = bb.model.generate(**bb.stock_inputs(prompt, [bb.fit_image(page_image, BUDGET)]), max_new_tokens=8,
                              do_sample=False)
    assert answer.generation.token_ids == stock[0, prompt.length:].tolist()


def test_layer_by_layer_forward_equals_stock_logits_with_two_images(qz5, page_image):
    """Our embeddings and positions through our layer loop (linear-attention layers included) give
    the stock forward's logits on a prompt with a page and a region."""
    bb = qz5.backbone
    region = page_image.crop((40, 60, 300, 200)).resize(bb.grid_pixels((3, 5)), Image.Resampling.BICUBIC)
    images = [bb.fit_image(page_image, BUDGET), region]
    encodings = [bb.encode_image(image) for image in images]
    prompt = bb.build_prompt(QUESTION, [e.grid for e in encodings])
    inputs = bb.prepare_inputs(prompt, encodings)
    with torch.no_grad():
        stock = bb.model(**bb.stock_inputs(prompt, images)).logits[0]
        expected_positions, _ = bb.model.model.get_rope_index(
            prompt.input_ids, mm_token_type_ids=(prompt.input_ids == bb.config.image_token_id).int(),
            image_grid_thw=torch.tensor([[1, r * 2, c * 2] for r, c in (e.grid for e in encodings)]))
        ours = bb.logits(bb.run_layers(inputs.embeds, inputs.positions, None, 0, bb.num_layers))[0]
    assert torch.equal(inputs.positions, expected_positions)
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def test_a_prompt_in_two_chunks_equals_one_pass_and_marks_the_split(qz5, page):
    """The coarse pass over a hybrid stack runs in two chunks split after the page's image: the same
    hidden states as one pass, and a mark holding each linear layer's states as the prefix left them."""
    bb = qz5.backbone
    prompt = bb.build_prompt(QUESTION, [page.grid])
    inputs = bb.prepare_inputs(prompt, [page.encoding])
    split = prompt.images[0].stop
    with torch.no_grad():
        whole = bb.run_layers(inputs.embeds, inputs.positions, bb.new_cache(), 0, 3)
        chunked, mark = run_marked(bb, inputs.embeds, inputs.positions, bb.new_cache(), 3, None, None, split)
        prefix_only = bb.new_cache()
        bb.run_layers(inputs.embeds[:, :split], inputs.positions[..., :split], prefix_only, 0, 3)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert mark.length == split and sorted(mark.states) == [0, 2]
    for index, (conv, state) in mark.states.items():
        want_conv, want_state = recurrent_state(prefix_only.layers[index])
        assert torch.equal(conv, want_conv) and torch.allclose(state, want_state, atol=1e-6)


def test_a_mark_of_some_rows_keeps_those_rows_states():
    conv = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4)
    state = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 2, 2) * 10
    picked = CacheMark(5, {0: (conv, state)}).rows([2, 0])
    assert picked.length == 5 and list(picked.states) == [0]
    assert picked.states[0][0][:, 0, 0].tolist() == [2.0, 0.0] and picked.states[0][1][:, 0, 0, 0].tolist() == [20, 0]


@pytest.mark.parametrize("branch_layer", [1, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_fused_prefill_with_cache_reuse_equals_prefill_from_scratch(qz5, page, page_image, aligned, branch_layer):
    """The fused read continues each linear layer from its state at the end of the page's image
    (the key/value layers cut back there): the logits and tokens of the fused sequence run from
    scratch; not aligned, also the stock forward's."""
    bb = qz5.backbone
    engine = ZoomEngine(bb, branch_layer, 1)
    prompt = bb.build_prompt(QUESTION, [page.grid])
    inputs = bb.prepare_inputs(prompt, [page.encoding])
    cache = bb.new_cache()
    box = Box(1, 1, 4, 3)
    crop = page.crop(grid_box_to_pixels(box, page.grid, page.size, 28), bb.grid_pixels((2, 3)))
    region = bb.encode_image(crop)
    fused = fuse_region(bb, QUESTION, prompt, page.encoding, region, box, aligned=aligned)
    with torch.no_grad():
        hidden_k, mark = run_marked(bb, inputs.embeds, inputs.positions, cache, branch_layer, None, None,
                                    fused.reused)
        reused, _, mask = engine.fused_prefill([fused], hidden_k, inputs.positions,
                                               torch.ones(1, fused.reused, dtype=torch.long), cache, mark)
        fresh = bb.new_cache()
        scratch = prefill(bb, fused.inputs.embeds, fused.inputs.positions, fresh)
        if not aligned:
            stock = bb.model(**bb.stock_inputs(fused.prompt, [bb.fit_image(page_image, BUDGET), crop])).logits[:, -1]
            torch.testing.assert_close(scratch, stock, atol=1e-4, rtol=1e-4)
    assert mask is None
    torch.testing.assert_close(reused, scratch, atol=1e-4, rtol=1e-4)
    assert greedy_decode(bb, reused, cache, fused.inputs.positions, 5).token_ids == \
        greedy_decode(bb, scratch, fresh, fused.inputs.positions, 5).token_ids


def test_a_padded_batch_through_linear_layers_equals_each_row_alone(qz5, page):
    """Two-segment padding puts padding between a row's real tokens, where a recurrent layer would
    read it; each row's hidden states and final states equal the row run alone, and the stock
    layer given the same padded batch would not (the test can tell)."""
    bb = qz5.backbone
    segments, alone, states = [], [], []
    with torch.no_grad():
        for text in ("Total?", "Which company issued this invoice, and to whom is it addressed?"):
            prompt = bb.build_prompt(text, [page.grid])
            inputs = bb.prepare_inputs(prompt, [page.encoding])
            split = prompt.images[0].stop
            segments.append([inputs.tokens(0, split), inputs.tokens(split)])
            cache = bb.new_cache()
            alone.append(bb.run_layers(inputs.embeds, inputs.positions, cache, 0, bb.num_layers)[0])
            states.append(recurrent_state(cache.layers[2])[1][0])
        batch = pad_segments(segments)
        cache = bb.new_cache()
        hidden = bb.run_layers(batch.embeds, batch.positions, cache, 0, bb.num_layers, batch.attention_mask)
        stock_layer = bb.decoder_layers[0](batch.embeds, position_embeddings=None,
                                           attention_mask=batch.attention_mask)
        ours_layer = bb.run_layers(batch.embeds, batch.positions, None, 0, 1, batch.attention_mask)
    for row, want in enumerate(alone):
        real = batch.attention_mask[row].bool()
        torch.testing.assert_close(hidden[row, real], want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(recurrent_state(cache.layers[2])[1][row], states[row], atol=1e-5, rtol=1e-5)
    padded_row = int(batch.attention_mask.sum(dim=1).argmin())
    real = batch.attention_mask[padded_row].bool()
    assert (stock_layer[padded_row, real] - ours_layer[padded_row, real]).abs().max() > 1e-3


@pytest.mark.parametrize("aligned", [False, True])
def test_batch_equals_single_runs(qz5, aligned):
    """Skip and zoom rows in one batch (the gate splits it) answer as each alone."""
    check_batch_equals_single(qz5, BUDGET, aligned)


def test_a_skipped_zoom_answers_as_never(qz5, page):
    """The coarse pass split for the mark and the gate's decision change nothing for a row that is
    not zoomed: its answer is `--zoom never`'s."""
    engine = ZoomEngine(qz5.backbone, 1, 1)
    never = engine.answer(page, QUESTION, ZoomSettings("never"), 4).generation
    skipped = engine.answer(page, QUESTION, ZoomSettings("auto", gate_threshold=1e9), 4)
    assert not skipped.trace.zoomed and skipped.generation.token_ids == never.token_ids
    assert skipped.generation.logprobs == pytest.approx(never.logprobs, abs=1e-4)


def test_a_region_head_reads_a_left_padded_batch_as_each_sample_alone(qz5, page):
    assert_region_maps_of_a_padded_batch_equal_each_alone(qz5.backbone, page)


def test_a_region_head_must_score_with_a_full_attention_layer(qz5, tmp_path):
    bb = qz5.backbone
    with pytest.raises(UsageError, match=r"K\+T-1 = 2 \(K=1, T=2\) is a linear-attention layer"):
        ZoomEngine(bb, 1, 2)
    ZoomEngine(bb, 2, 2)  # last layer 3: full attention
    config = AdapterConfig(branch_layer=2, depth=1, family=bb.family, hidden_size=bb.hidden_size)
    with pytest.raises(AdapterMismatch, match="choose K among 1, 3"):
        ZoomAdapter(config, bb)
    ZoomAdapter(AdapterConfig(branch_layer=2, depth=1, region_head=False), bb)  # a gate alone may sit anywhere
    with pytest.raises(UsageError, match="linear-attention"):
        QZoom.from_pretrained(str(bb.model_id), device="cpu", branch_layer=1, depth=2)


@pytest.mark.parametrize("mode", ["never", "always"])
def test_static_decoder_equals_eager(qz5, page, mode):
    """The static cache holds the recurrent states too (copied in, advanced in place by the step);
    a second call reuses the session's cache."""
    check_static_decoder_equals_eager(qz5.backbone, page, mode, calls=2)


def test_capture_restores_everything_a_decode_step_changes(qz5, page):
    """CUDA graph capture warms the step up on the session's own tensors, then restores what
    `_state` lists: every tensor a step changes must be listed, the recurrent states included, or
    the warm-up would leak into the answer (keys and values change only at the cursor's slot,
    the output buffers only at the step's column, both written before they are read)."""
    from qzoom_cli.static_decode import StaticDecoder, _state

    bb = qz5.backbone
    prompt = bb.build_prompt(QUESTION, [page.grid])
    inputs = bb.prepare_inputs(prompt, [page.encoding])
    cache = bb.new_cache()
    prefill(bb, inputs.embeds, inputs.positions, cache)
    decoder = StaticDecoder(bb, capture=False)
    with torch.inference_mode():
        session = decoder._session(cache, inputs.positions, 4)
        decoder._load(session, cache, inputs.positions, None)
        written = [session.out_tokens, session.out_logprobs]
        for layer in session.cache.layers:
            written += [layer.keys, layer.values] if hasattr(layer, "keys") else []
        tensors = [session.tokens, session.positions, session.visible, session.step, session.done,
                   *(t for layer in session.cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)),
                   *(t for layer in session.cache.layers for d in vars(layer).values() if isinstance(d, dict)
                     for t in d.values() if isinstance(t, torch.Tensor))]
        before = [t.clone() for t in tensors]
        decoder._step(session)
    changed = [t for t, old in zip(tensors, before, strict=True) if not torch.equal(t, old)]
    listed = {id(t) for t in _state(session)}
    recurrent = {id(t) for layer in session.cache.layers if hasattr(layer, "recurrent_states")
                 for t in layer.recurrent_states.values()}
    assert recurrent & {id(t) for t in changed}  # the step did advance a recurrent state
    assert all(id(t) in listed for t in changed if all(t is not w for w in written))


@pytest.mark.graphs
def test_the_decode_step_is_one_graph(qz5, page):
    from zoomkit import check_decode_step_is_one_graph

    check_decode_step_is_one_graph(qz5.backbone, [(page, "Total?"), (page, "Date?")], ZoomSettings("always"))


def test_thinking_on_request(hybrid_dir, page_image):
    """--think: the prompt opens a reasoning block, the answer is what follows </think>, and an answer
    cut off while reasoning says so; the same checkpoint without it answers at once."""
    qz = QZoom.from_pretrained(str(hybrid_dir), device="cpu", thinking=True)
    bb = qz.backbone
    end = bb.tokenizer.convert_tokens_to_ids("</think>")
    assert bb.reasoning_end_id == end and qz.default_max_new_tokens() == 1024
    text = bb.tokenizer.decode(bb.build_prompt("q", [(2, 2)]).input_ids[0])
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    words = bb.tokenizer.encode(" total due", add_special_tokens=False)
    eos = bb.eos_token_ids[0]
    assert qz._text(Generation(token_ids=[*words, end, *words, eos], finished=True)) == ("total due", "total due")
    assert qz._text(Generation(token_ids=[*words], finished=False)) == ("", "total due")
    [result] = qz.ask(make_pdf(1), "total?", max_new_tokens=3, dpi=72, budget=BUDGET, zoom="never")
    assert result.status == "truncated" and result.stats.output_tokens == 3
    if result.reasoning is not None:
        assert result.answer == "" and "still reasoning" in result.warnings[-1]
    from dataclasses import replace

    from qzoom_cli.serve.chat import completion

    reasoned = replace(result, answer="total due", reasoning="the total row")
    message = completion(reasoned, "m")["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("total due", "the total row")
    assert "reasoning_content" not in completion(replace(reasoned, reasoning=None), "m")["choices"][0]["message"]
    image = bb.fit_image(page_image, VisualBudget(4, 4))
    view = bb.encode_image(image)
    prompt = bb.build_prompt("total?\nAnswer the question using a single word or phrase.", [view.grid])
    stock = bb.model.generate(**bb.stock_inputs(prompt, [image]), max_new_tokens=6, do_sample=False)
    inputs = bb.prepare_inputs(prompt, [view])
    ours = greedy_decode(bb, prefill(bb, inputs.embeds, inputs.positions, cache := bb.new_cache()), cache,
                         inputs.positions, 6)
    assert ours.token_ids == stock[0, prompt.length:].tolist()[:len(ours.token_ids)]


def test_think_is_refused_by_a_model_that_cannot_reason_first_and_kept_by_one_that_always_does(tiny_dir, tmp_path):
    result = runner.invoke(cli.app, ["ask", "samples/receipt.png", "total?", "--model", str(tiny_dir),
                                     "--device", "cpu", "--think"])
    assert result.exit_code == 2 and "no thinking switch" in result.stderr
    thinking = QZoom.from_pretrained(str(make_tiny(tmp_path / "thinking", family="qwen3_vl", thinking=True)),
                                     device="cpu", thinking=True)  # a Thinking checkpoint reasons anyway
    assert thinking.backbone.reasoning_end_id == thinking.backbone.tokenizer.convert_tokens_to_ids("</think>")


@pytest.mark.parametrize("command", ["ask", "run", "eval", "bench", "serve"])
@pytest.mark.parametrize("flag, wanted", [([], None), (["--think"], True), (["--no-think"], False)])
def test_every_answering_command_takes_think(command, flag, wanted, monkeypatch):
    from zoomkit import COMMAND_ARGS, load_model_arguments

    assert load_model_arguments([*COMMAND_ARGS[command], *flag], monkeypatch).get("think") == wanted


def test_make_tiny_command(tmp_path):
    result = runner.invoke(cli.app, ["models", "make-tiny", str(tmp_path / "moe"), "--family", "qwen3_5", "--moe"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe"
    assert config["text_config"]["layer_types"].count("full_attention") >= 2
    assert config["text_config"]["layer_types"].count("linear_attention") >= 2


def test_the_cards_branch_where_the_region_head_scores_with_a_full_attention_layer():
    """Qwen3.5/3.6 stack three linear-attention layers, then a full-attention one (layers 3, 7, 11, ...):
    every card's K+T-1 is one of those, and answers are short unless --think."""
    from qzoom_cli.cards import load_cards

    cards = [card for card in load_cards() if card.family in ("qwen3_5", "qwen3_5_moe")]
    assert {card.id for card in cards} >= {f"Qwen/Qwen3.5-{size}" for size in ("0.8B", "2B", "4B", "9B", "27B",
                                                                              "35B-A3B")} | \
        {"Qwen/Qwen3.6-27B", "Qwen/Qwen3.6-35B-A3B"}
    for card in cards:
        last = card.zoom["branch_layer"] + card.zoom["depth"] - 1
        assert last % 4 == 3 and not card.thinking and card.system_prompt is None, card.id
        assert card.family == ("qwen3_5_moe" if "A3B" in card.id else "qwen3_5")


def test_without_a_card_the_branch_moves_to_where_the_head_scores_with_full_attention():
    from qzoom_cli.api import default_branch

    assert default_branch(28, tuple(range(28))) == (19, 3)  # every layer has keys: two thirds up, as before
    for layers, card_k in ((24, 17), (32, 21), (40, 25), (64, 41)):  # the cards' K for these depths
        assert default_branch(layers, tuple(range(3, layers, 4))) == (card_k, 3)
    assert default_branch(4, (1, 3)) == (3, 1)


def test_teacher_heads_come_from_full_attention_layers(qz5):
    from qzoom_cli.training.rpn import rpn_settings

    settings = rpn_settings(qz5)
    assert (settings.branch_layer, settings.depth) == (3, 1) and settings.heads.layers == [1]
    with pytest.raises(UsageError, match="--branch-layer"):
        rpn_settings(qz5, branch_layer=2, depth=1)


def test_train_run_eval_bench_commands(hybrid_dir, tmp_path):
    """The commands on Qwen3.5: train rpn (teacher pass on full-attention heads) -> train gate -> run
    (rows batched), eval, bench (stock generate() included), and ask --think."""
    model = check_train_run_eval_bench(hybrid_dir, tmp_path, batch_size="4", bench_modes="stock,never")
    thought = runner.invoke(cli.app, ["ask", str(tmp_path / "p0.png"), "Where?", *model, "--think", "--json",
                                      "--max-new-tokens", "3", "--zoom", "never"])
    assert thought.exit_code == 0, thought.stderr
    assert json.loads(thought.stdout)["status"] == "truncated"


def test_fine_tuning_tunes_the_linear_attention_layers_when_asked(hybrid_dir, tmp_path):
    """`train sft` on Qwen3.5 with the Gated DeltaNet projections among the LoRA targets: the loss
    falls, and the adapter `ask` loads carries LoRA weights on both kinds of layer."""
    from safetensors import safe_open
    from trainkit import mined_pairs, red_square_pages

    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.settings import LoraSettings
    from qzoom_cli.training.sft import SftSettings, train_sft
    from qzoom_cli.zoom.lora import LORA_FOLDER

    qz = QZoom.from_pretrained(str(hybrid_dir), device="cpu")  # its own: LoRA goes into the base model
    adapter = trained_adapter(qz.backbone, gate=False, reuse_src_pos=True)
    manifest, _ = red_square_pages(tmp_path, 4, seed=13)
    samples, mined = mined_pairs(manifest)
    lora = LoraSettings(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "in_proj_qkv", "out_proj", "down_proj"))
    settings = SftSettings(budget=VisualBudget(16, 36), lora=lora, dpi=72)
    _, losses = train_sft(qz, adapter, samples, mined, settings,
                          TrainOptions(epochs=6, lr=1e-2, batch_size=2, warmup_ratio=0.0), tmp_path / "tuned")
    assert losses[-1] < losses[0] * 0.6
    with safe_open(tmp_path / "tuned" / LORA_FOLDER / "adapter_model.safetensors", framework="pt") as weights:
        names = list(weights.keys())
    assert any(".linear_attn.in_proj_qkv." in n for n in names) and any(".self_attn.q_proj." in n for n in names)
    tuned = QZoom.from_pretrained(str(hybrid_dir), adapter=str(tmp_path / "tuned"), device="cpu")
    [result] = tuned.ask(str(tmp_path / "page0.png"), "Where is the red square?", max_new_tokens=2, zoom="always")
    assert result.status in ("ok", "truncated")


def test_train_all_on_the_hybrid_stack(hybrid_dir, tmp_path):
    """`train all` end to end on Qwen3.5 (teacher passes for real, on full-attention heads, before
    and after tuning; the mined pairs and answer ladders seeded, as a finished pass leaves them,
    since a random model's answers give nothing to learn): one adapter that `ask` uses, with LoRA
    on the linear-attention layers too."""
    from trainkit import red_square_pages, seed_ladders, seed_mined

    from qzoom_cli.training.recipe import STAGES

    manifest, _ = red_square_pages(tmp_path, 4, seed=32)
    out = tmp_path / "out"
    question = "Where is the red square?"
    seed_mined(manifest, out / "stages" / "sft" / "mined", plain="top left", zoomed="bottom")
    seed_ladders(manifest, out / "stages" / "gate" / "ladders", (16, 36, 64, 100),
                 {question: ["?", "top", "top left", "top left"]})
    args = ["train", "all", "--json", str(manifest), "--out", str(out), "--view-tokens", "64", "--branch-layer", "2",
            "--depth", "2", "--ladder", "16,36,64,100", "--max-visual-tokens", "36", "--min-visual-tokens", "16",
            "--lora-rank", "4", "--lora-alpha", "8", "--held-out", "0", "--batch-size", "2", "--peak-floor", "0",
            "--max-area", "1.01", "--lora-targets", "q_proj,in_proj_qkv,down_proj", "--model", str(hybrid_dir),
            "--device", "cpu", "--dpi", "72"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.stderr
    assert list(json.loads(result.stdout)["stages"]) == list(STAGES)
    ask = runner.invoke(cli.app, ["ask", str(tmp_path / "page0.png"), question, "--adapter", str(out), "--json",
                                  "--max-new-tokens", "2", "--model", str(hybrid_dir), "--device", "cpu"])
    assert ask.exit_code == 0, ask.stderr
    assert json.loads(ask.stdout)["zoom"]["gate"]["kind"] == "trained"


@pytest.mark.parametrize("aligned", [True, False])
def test_fine_tuning_input_scores_the_answer_as_decoding_reads_it(qz5, page, aligned):
    from zoomkit import check_teacher_forcing

    check_teacher_forcing(qz5, page, QUESTION, BUDGET, aligned)
