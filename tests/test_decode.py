"""Our prefill + greedy loop against the stock transformers model on the same inputs."""

import pytest
import torch
from PIL import Image, ImageDraw

from qzoom_cli.backbones import ImageBlock
from qzoom_cli.backbones.qwen2_5_vl import mrope_position_ids
from qzoom_cli.budget import VisualBudget
from qzoom_cli.decode import answer_plainly


def _page(seed: int) -> Image.Image:
    image = Image.new("RGB", (420, 560), (255, 255, 250))
    draw = ImageDraw.Draw(image)
    for i in range(6):
        draw.text((20, 20 + 80 * i), f"line {seed * 7 + i}: amount {seed * 13 + i}.00", fill=(0, 0, 0))
    return image


def _inputs(bb, image, question):
    resized = bb.fit_image(image, VisualBudget(16, 96))
    prompt = bb.build_prompt(question, [bb.image_grid(resized.size, VisualBudget(16, 96))])
    return resized, prompt


def _ours(bb, resized, prompt, max_new_tokens):
    return answer_plainly(bb, bb.prepare_inputs(prompt, [bb.encode_image(resized)]), max_new_tokens)


def _stock(bb, resized, prompt, max_new_tokens, **kwargs):
    batch = bb.image_processor(images=[resized], do_resize=False, return_tensors="pt")
    ids = prompt.input_ids
    return bb.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                             image_grid_thw=batch["image_grid_thw"], max_new_tokens=max_new_tokens, do_sample=False,
                             mm_token_type_ids=(ids == bb.config.image_token_id).int(), **kwargs)


@pytest.mark.parametrize("seed,question", [(0, "What is the total due?"), (1, "Which line mentions 20?"),
                                           (2, "date?")])
def test_greedy_tokens_equal_stock_generate(qz, seed, question):
    bb = qz.backbone
    resized, prompt = _inputs(bb, _page(seed), question)
    ours = _ours(bb, resized, prompt, 12)
    stock = _stock(bb, resized, prompt, 12)[0, prompt.length:].tolist()
    assert ours.token_ids == stock


def test_logprobs_equal_a_full_forward(qz):
    """Each step's log-probability equals the stock forward's on the whole sequence."""
    bb = qz.backbone
    resized, prompt = _inputs(bb, _page(3), "How much?")
    ours = _ours(bb, resized, prompt, 6)
    batch = bb.image_processor(images=[resized], do_resize=False, return_tensors="pt")
    ids = torch.cat([prompt.input_ids, torch.tensor([ours.token_ids[:-1]])], dim=1)
    with torch.no_grad():
        out = bb.model(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                       mm_token_type_ids=(ids == bb.config.image_token_id).int())
    logprobs = torch.log_softmax(out.logits[0, prompt.length - 1:].float(), dim=-1)
    expected = [float(logprobs[i, t]) for i, t in enumerate(ours.token_ids)]
    assert ours.logprobs == pytest.approx(expected, abs=1e-4)
    assert ours.score == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_mrope_positions_equal_get_rope_index(qz):
    bb = qz.backbone
    for grid in [(3, 5), (6, 2), (1, 1), (4, 4)]:
        prompt = bb.build_prompt("a question", [grid])
        ids = prompt.input_ids
        expected, _ = bb.model.model.get_rope_index(
            ids, mm_token_type_ids=(ids == bb.config.image_token_id).int(),
            image_grid_thw=torch.tensor([[1, grid[0] * 2, grid[1] * 2]]))
        assert torch.equal(bb.position_ids(prompt).cpu(), expected)


def test_mrope_two_images_and_trailing_text():
    blocks = [ImageBlock(2, 2, 3), ImageBlock(10, 1, 2)]
    pos = mrope_position_ids(14, blocks)[:, 0]
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 2:8].tolist() == [2] * 6 and pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3]
    assert pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]
    assert pos[:, 8:10].tolist() == [[5, 6]] * 3  # text resumes at 2 + max(2, 3)
    assert pos[1:, 10:12].tolist() == [[7, 7], [7, 8]]
    assert pos[:, 12:].tolist() == [[9, 10]] * 3


def test_prompt_has_one_pad_per_visual_token(qz):
    bb = qz.backbone
    prompt = bb.build_prompt("q", [(4, 7)])
    ids = prompt.input_ids[0]
    assert int((ids == bb.config.image_token_id).sum()) == 28
    block = prompt.images[0]
    assert ids[block.start - 1] == bb.config.vision_start_token_id
    assert ids[block.stop] == bb.config.vision_end_token_id
    assert bb.tokenizer.decode(ids).endswith("q<|im_end|>\n<|im_start|>assistant\n")


def test_end_token_stops_decoding(qz, monkeypatch):
    bb = qz.backbone
    resized, prompt = _inputs(bb, _page(4), "stop?")
    first = _ours(bb, resized, prompt, 3).token_ids[0]
    monkeypatch.setattr(type(bb), "eos_token_ids", property(lambda self: [first]))
    stopped = _ours(bb, resized, prompt, 3)
    assert stopped.token_ids == [first] and stopped.finished


def test_image_must_be_resized_first(qz):
    with pytest.raises(ValueError, match="multiple of 28"):
        qz.backbone.encode_image(Image.new("RGB", (100, 100)))


def test_chat_template_fallbacks(qz, tiny_dir, tmp_path):
    """Without a template in the tokenizer, the processor's legacy chat_template.json is used, and
    without either the standard Qwen-VL format (which the tiny kit's template reproduces)."""
    import json
    import shutil

    from qzoom_cli.backbones.qwen2_5_vl import QWEN_VL_CHAT_TEMPLATE
    from qzoom_cli.backbones.stock import chat_template

    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "chat_template.jinja").unlink()
    tokenizer = type(qz.backbone.tokenizer).from_pretrained(bare)
    tokenizer.chat_template = None
    assert chat_template(tokenizer, str(bare), None, QWEN_VL_CHAT_TEMPLATE) == QWEN_VL_CHAT_TEMPLATE
    (bare / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'legacy' }}"}))
    assert chat_template(tokenizer, str(bare), None, QWEN_VL_CHAT_TEMPLATE) == "{{ 'legacy' }}"
    from qzoom_cli import QZoom

    assert QZoom.from_pretrained(str(bare), device="cpu").backbone.tokenizer.chat_template == "{{ 'legacy' }}"
