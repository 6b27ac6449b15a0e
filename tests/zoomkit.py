"""Test helpers: a 'trained' zoom adapter for the tiny model and the official Q-Zoom layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qzoom_cli.backbones import ImageBlock
from qzoom_cli.padding import pad_segments
from qzoom_cli.zoom.adapter import AdapterConfig, ZoomAdapter
from qzoom_cli.zoom.region import RegionHead, region_logits


def trained_adapter(backbone, branch_layer=2, depth=2, gate=True, reuse_src_pos=False, seed=0,
                    **config) -> ZoomAdapter:
    """Branch layers copied from the base, then nudged, as a stand-in for a trained adapter."""
    config = AdapterConfig(branch_layer=branch_layer, depth=depth, gate=gate, reuse_src_pos=reuse_src_pos,
                           family=backbone.family, hidden_size=backbone.hidden_size, base_model=backbone.model_id,
                           **config)
    adapter = ZoomAdapter.initialized_from_base(config, backbone)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in adapter.named_parameters():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * (0.5 if "head" in name else 0.05))
    return adapter


def write_official_checkpoint(base_dir: Path, adapter: ZoomAdapter, out_dir: Path, shards: int = 2) -> Path:
    """The base checkpoint as the released Q-Zoom checkpoints store it, sharded with an index.

    Qwen2.5-VL as transformers 4.51 wrote it (`model.*`, `visual.*`, zoom tensors under
    `model.twig_layers.*` ...), Q-Zoom's keys at the top of config.json; Qwen3-VL in the native
    layout (zoom tensors under `model.language_model.`), the keys at the top and copied into
    `text_config`, and the tied `lm_head.weight` saved as an equal copy, as its merge script does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in base_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, out_dir / path.name)
    qwen3 = adapter.config.family.startswith("qwen3")
    tensors = {}
    with safe_open(base_dir / "model.safetensors", framework="pt") as weights:
        for key in weights.keys():
            new = key if qwen3 else key.replace("model.language_model.", "model.", 1).replace("model.visual.",
                                                                                              "visual.", 1)
            tensors[new] = weights.get_tensor(key)
    if qwen3:
        tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].clone()
    prefix = "model.language_model." if qwen3 else "model."
    for key, tensor in adapter.state_dict().items():
        tensors[prefix + key] = tensor.detach().clone()
    names = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        shard = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[index::shards]}
        save_file(part, out_dir / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in part})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((out_dir / "config.json").read_text())
    cfg = adapter.config
    keys = {"enable_twig": True, "twig_K": cfg.branch_layer, "twig_T": cfg.depth, "roi_source": "qk",
            "roi_loss": "bce", "roi_multi_head": True, "enable_high_res": cfg.gate,
            "reuse_src_pos": cfg.reuse_src_pos, "min_pixels": 451584, "max_pixels": 451584}
    config.update(keys)
    if qwen3:
        config["text_config"].update(keys)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def check_batch_equals_single(qz, budget, aligned: bool) -> None:
    """Two pages at different budgets, two questions each, a gate threshold between the middle
    scores: skip and zoom rows in one batch answer as each alone (tokens, regions, log-probs)."""
    import pytest
    from docmaker import make_pdf

    from qzoom_cli.budget import VisualBudget
    from qzoom_cli.documents import open_document
    from qzoom_cli.zoom.pipeline import ZoomEngine, ZoomSettings

    bb = qz.backbone
    engine = ZoomEngine(bb, 2, 2, trained_adapter(bb, reuse_src_pos=aligned, seed=3), reuse_src_pos=aligned)
    with open_document(make_pdf(2), dpi=72) as doc:  # open while regions are cut from its pages
        pages = [qz.page_view(doc, 1, budget), qz.page_view(doc, 2, VisualBudget(8, 24))]
        items = [(p, q) for p in pages for q in ("Total?", "Which company issued this invoice, and when?")]
        probe = sorted(engine.answer(p, q, ZoomSettings("auto", gate_threshold=0.0), 1).trace.gate.score
                       for p, q in items)
        settings = ZoomSettings("auto", gate_threshold=(probe[1] + probe[2]) / 2, roi_threshold=0.3)
        singles = [engine.answer(p, q, settings, 5) for p, q in items]
        batch = engine.answer_batch(items, settings, 5)
    assert 0 < sum(a.trace.zoomed for a in singles) < len(items)
    for single, batched in zip(singles, batch, strict=True):
        assert batched.generation.token_ids == single.generation.token_ids
        assert batched.trace.region == single.trace.region
        assert batched.generation.logprobs == pytest.approx(single.generation.logprobs, abs=1e-4)


def check_static_decoder_equals_eager(bb, page, mode: str, calls: int = 1) -> None:
    """Two questions of different lengths about `page`, batched: the static-cache decoder gives the
    eager loop's tokens, regions and log-probs, `calls` times (later calls reuse its session)."""
    import pytest

    from qzoom_cli.decode import EagerDecoder
    from qzoom_cli.static_decode import StaticDecoder
    from qzoom_cli.zoom.pipeline import ZoomEngine, ZoomSettings

    eager = ZoomEngine(bb, 2, 2, decode=EagerDecoder(bb))
    fast = ZoomEngine(bb, 2, 2, decode=StaticDecoder(bb, capture=False))
    items = [(page, "Total?"), (page, "Which company issued this invoice, and to whom is it addressed?")]
    settings = ZoomSettings(mode, roi_threshold=0.3)
    for _ in range(calls):
        for want, got in zip(eager.answer_batch(items, settings, 6), fast.answer_batch(items, settings, 6),
                             strict=True):
            assert got.generation.token_ids == want.generation.token_ids and got.trace.region == want.trace.region
            assert got.generation.logprobs == pytest.approx(want.generation.logprobs, abs=1e-4)


def check_train_run_eval_bench(model_dir: Path, tmp_path: Path, batch_size: str = "1",
                                bench_modes: str = "never") -> list[str]:
    """The commands end to end on a family's tiny checkpoint, on four pages with a red square moving
    right: train rpn (teacher pass) -> train gate -> run (batched, zoomed), eval, bench. Returns the
    model flags, for more commands on it."""
    from PIL import Image, ImageDraw
    from typer.testing import CliRunner

    from qzoom_cli import cli

    runner = CliRunner()
    rows = []
    for i in range(4):
        image = Image.new("RGB", (256, 256), "white")
        ImageDraw.Draw(image).rectangle([20 + 30 * i, 40, 90 + 30 * i, 110], fill=(220, 20, 20))
        image.save(tmp_path / f"p{i}.png")
        rows.append({"id": f"s{i}", "file": f"p{i}.png", "question": "Where is the red square?", "answers": ["top"]})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = ["--model", str(model_dir), "--device", "cpu", "--dpi", "72"]
    out = tmp_path / "adapter"
    rpn = runner.invoke(cli.app, ["train", "rpn", "--json", str(manifest), "--out", str(out), "--view-tokens", "16",
                                  "--batch-size", "2", "--peak-floor", "0", "--max-area", "1.01", *model])
    assert rpn.exit_code == 0, rpn.stderr
    assert json.loads((out / "qzoom_config.json").read_text())["family"] == model_dir.name
    gate = runner.invoke(cli.app, ["train", "gate", "--json", str(manifest), "--adapter", str(out), "--ladder", "4,9,16",
                                   "--batch-size", "2", "--max-new-tokens", "2", *model])
    assert gate.exit_code in (0, 2), gate.stderr  # 2: no ladder survived the filter (random answers)
    common = [*model, "--adapter", str(out), "--max-new-tokens", "2", "--max-visual-tokens", "24",
              "--min-visual-tokens", "8"]
    ran = runner.invoke(cli.app, ["run", str(manifest), *common, "--zoom", "always", "--batch-size", batch_size])
    assert ran.exit_code == 0, ran.stderr
    records = [json.loads(line) for line in ran.stdout.splitlines()]
    assert len(records) == 4 and all(r["zoom"]["zoomed"] or r["zoom"]["skipped_reason"] for r in records)
    assert all(r["model"]["family"] == model_dir.name for r in records)
    evaluated = runner.invoke(cli.app, ["eval", str(manifest), *common, "--compare", "never,always", "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert [m["rows"] for m in json.loads(evaluated.stdout)["modes"]] == [4, 4]
    bench = runner.invoke(cli.app, ["bench", str(manifest), *model, "--max-new-tokens", "2", "--budgets", "16,24",
                                    "--modes", bench_modes, "--out", str(tmp_path / "bench"), "--limit", "2"])
    assert bench.exit_code == 0, bench.stderr
    return model


def load_model_arguments(args: list[str], monkeypatch) -> dict:
    """What a command passes to `load_model` (which stops it there): the flags' journey, no model loaded."""
    import inspect
    import sys

    from typer.testing import CliRunner

    from qzoom_cli import cli
    from qzoom_cli.cli.common import load_model

    seen = []

    def load(*args, **kwargs):
        seen.append(inspect.signature(load_model).bind(*args, **kwargs).arguments)
        raise SystemExit(0)

    for module in ("ask", "run", "scoring", "serve"):  # the modules (the package's names are the commands)
        monkeypatch.setattr(sys.modules[f"qzoom_cli.cli.{module}"], "load_model", load)
        monkeypatch.setattr(sys.modules[f"qzoom_cli.cli.{module}"], "preflight", lambda *args: None)  # no model here
    result = CliRunner().invoke(cli.app, args)
    assert len(seen) == 1, result.stderr
    return seen[0]


COMMAND_ARGS = {"ask": ["ask", "samples/invoice.pdf", "q?"], "run": ["run", "samples/questions.jsonl", "--force"],
                "eval": ["eval", "samples/questions.jsonl"], "bench": ["bench", "samples/questions.jsonl"],
                "serve": ["serve", "--port", "0"]}


def threshold_between(scores: list[float]) -> float:
    """A gate threshold halfway between the middle two scores: about half the rows zoom, and no score
    sits on it (batched and single scores differ in the last bits)."""
    ordered = sorted(scores)
    middle = len(ordered) // 2
    return (ordered[middle - 1] + ordered[middle]) / 2


def check_teacher_forcing(qz, page, text, budget, aligned: bool, box=(1, 1, 3, 4)) -> None:
    """Targeted fine-tuning's input scores every answer token exactly as inference reads it: the
    fused prompt prefilled into a cache, then the answer fed one token at a time at decoding's
    positions (deepstack additions included); its loss is the mean cross-entropy of those logits."""
    import pytest

    from qzoom_cli.decode import prefill
    from qzoom_cli.training.sft import answer_loss, answer_token_ids, fused_prompt, with_answer
    from qzoom_cli.zoom.geometry import Box

    bb = qz.backbone
    fused = fused_prompt(bb, page, text, Box(*box), budget, aligned)
    assert fused.inputs.positions.is_floating_point() == aligned  # the adapter's position scheme
    answer = answer_token_ids(bb, "$100.00")
    assert answer[-1] == bb.eos_token_ids[0] and bb.decode_text(answer[:-1]) == "$100.00"
    assert not set(answer[:-1]) & set(bb.tokenizer.all_special_ids)  # generation starts after the prompt: no BOS
    inputs = with_answer(bb, fused.inputs, answer)
    with torch.inference_mode():  # prefill fills the cache in inference mode: the steps continue in it
        hidden = bb.run_layers(inputs.embeds, inputs.positions, None, 0, bb.num_layers, None, inputs.additions)
        teacher_forced = bb.logits(hidden)[0, fused.inputs.length - 1:-1]
        cache = bb.new_cache()
        stepwise = [prefill(bb, fused.inputs.embeds, fused.inputs.positions, cache, None, fused.inputs.additions)[0]]
        for step, token in enumerate(answer[:-1]):
            position = bb.next_position_ids(fused.inputs.positions, step).to(fused.inputs.positions.dtype)
            out = bb.run_layers(bb.embed_tokens(torch.tensor([[token]], device=bb.device)), position, cache, 0,
                                bb.num_layers)
            stepwise.append(bb.logits(out)[0, -1])
        assert torch.allclose(teacher_forced, torch.stack(stepwise), atol=1e-4)
        expected = torch.nn.functional.cross_entropy(torch.stack(stepwise).float(), torch.tensor(answer))
        assert answer_loss(bb, inputs, answer).item() == pytest.approx(expected.item(), rel=1e-4)


def write_sentencepiece_tokenizer(folder: Path) -> Path:
    """A Llama-style sentencepiece tokenizer (`tokenizer.model` and its config, nothing else), as
    original-layout LLaVA checkpoints ship theirs: BPE with byte fallback, a dummy prefix, no
    normalisation; trained on the tiny kit's text. Returns the model file."""
    import sentencepiece

    from qzoom_cli.testing import LLAVA_TEXT, TRAINING_TEXT

    text = folder / "tokenizer-text.txt"
    text.write_text("\n".join((TRAINING_TEXT + LLAVA_TEXT) * 4))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    text.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    return folder / "tokenizer.model"


def write_original_llava(hf_dir: Path, adapter: ZoomAdapter, out_dir: Path, with_tower: bool = False,
                         sentencepiece: bool = False) -> Path:
    """The tiny llava-hf checkpoint and an SD-RPN region head as the original LLaVA-1.5 layout
    stores them (LlavaLlamaForCausalLM: model.layers, model.mm_projector, model.twig_layers,
    model.twig_norm, a training-only twig_head, rotary buffers), the CLIP tower beside it unless
    `with_tower`, the tiny tokenizer's files or (`sentencepiece`) only a `tokenizer.model`, as the
    released checkpoints ship it. Returns the CLIP folder it names."""
    from transformers import LlavaForConditionalGeneration

    out_dir.mkdir(parents=True)
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    renames = [("model.language_model.", "model."), ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
               ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
               ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.")]
    original = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.vision_tower.") and not with_tower:
            continue
        new = next((new + key[len(old):] for old, new in renames if key.startswith(old)), key)
        original[new] = tensor.clone()
    original.update({f"model.{key}": tensor for key, tensor in adapter.state_dict().items()})
    original["twig_head.weight"] = model.lm_head.weight.detach().clone()
    original["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(original, out_dir / "model.safetensors", metadata={"format": "pt"})
    clip_dir = out_dir.parent / f"{out_dir.name}-clip"
    model.model.vision_tower.save_pretrained(clip_dir)
    shutil.copy(hf_dir / "preprocessor_config.json", clip_dir)
    text = config["text_config"]
    (out_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        **{key: text[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                      "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size")},
        "rope_theta": text["rope_parameters"]["rope_theta"], "mm_vision_tower": str(clip_dir),
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad", "mm_hidden_size": config["vision_config"]["hidden_size"], "enable_twig": True,
        "twig_K": adapter.config.branch_layer, "twig_T": adapter.config.depth, "roi_multi_head": True,
        "roi_super_type": "v1", "roi_source": "qk"}))
    if sentencepiece:
        write_sentencepiece_tokenizer(out_dir)
        return clip_dir
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, out_dir)
    return clip_dir


def assert_region_maps_of_a_padded_batch_equal_each_alone(bb, page):
    """A three-layer region head on a left-padded batch: its layers before the scoring one see the
    padding masked, and each sample's first token (the sink test of Qwen3-VL) is its own, so each
    map and its sink cells equal the sample's alone."""
    head = RegionHead(list(bb.decoder_layers[1:4]))
    alone, segments, blocks = [], [], []
    with torch.no_grad():
        for text in ("What is the total due? Answer with a single word.", "Total?"):
            prompt = bb.build_prompt(text, [page.grid])
            inputs = bb.prepare_inputs(prompt, [page.encoding])
            [one] = region_logits(bb, head, inputs.embeds, inputs.positions, [prompt.images[0]])
            alone.append(one)
            segments.append([inputs])
            blocks.append(prompt.images[0])
        batch = pad_segments(segments)
        assert batch.padded
        moved = [ImageBlock(batch.index(i, 0, block.start), block.rows, block.cols) for i, block in enumerate(blocks)]
        maps = region_logits(bb, head, batch.embeds, batch.positions, moved, batch.attention_mask)
    for got, want in zip(maps, alone, strict=True):
        assert torch.allclose(got.logits, want.logits, atol=1e-4) and torch.equal(got.keep, want.keep)


def base_answer_loss(qz, sample, pair, budget, free_answers: bool = False, aligned: bool = False) -> float:
    """The model's loss on mined `pair`'s answer after the fused sequence `ask` reads for it (the
    page of `sample` at `budget`, the pair's box as the region)."""
    from qzoom_cli.documents import open_document
    from qzoom_cli.training.rpn import prompt_text
    from qzoom_cli.training.sft import answer_loss, answer_token_ids, fused_prompt, with_answer
    from qzoom_cli.zoom.geometry import Box

    bb = qz.backbone
    with open_document(sample.file, dpi=72) as doc:
        fused = fused_prompt(bb, qz.page_view(doc, sample.page, budget), prompt_text(sample.question, free_answers),
                             Box(*pair.box), budget, aligned)
    answer = answer_token_ids(bb, pair.target)
    with torch.no_grad():
        return answer_loss(bb, with_answer(bb, fused.inputs, answer), answer).item()


def check_decode_step_is_one_graph(bb, items, settings) -> None:
    """The static decoder's step, traced by dynamo as one graph (`fullgraph`), decodes the eager
    loop's tokens. A step that reads a value back to the host, which CUDA graph capture refuses
    (`--compile auto` would then fall back to the slower uncaptured step), breaks the trace: the
    capture promise checked on CPU, for every family."""
    from qzoom_cli.decode import EagerDecoder
    from qzoom_cli.static_decode import StaticDecoder
    from qzoom_cli.zoom.pipeline import ZoomEngine

    torch.compiler.reset()
    decoder = StaticDecoder(bb, capture=False)
    decoder._run_step = torch.compile(decoder._step, fullgraph=True, backend="eager")
    eager = ZoomEngine(bb, 2, 2, decode=EagerDecoder(bb))
    traced = ZoomEngine(bb, 2, 2, decode=decoder)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        answers = traced.answer_batch(items, settings, 4)
    for want, got in zip(eager.answer_batch(items, settings, 4), answers, strict=True):
        assert got.generation.token_ids == want.generation.token_ids
