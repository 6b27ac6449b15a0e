"""Speed properties no output shows, pinned by counting the work done: tokens through each layer,
images through the vision tower."""

from collections import Counter

import pytest
from docmaker import make_pdf
from zoomkit import trained_adapter

from qzoom_cli.budget import VisualBudget
from qzoom_cli.documents import open_document
from qzoom_cli.zoom.pipeline import ZoomEngine, ZoomSettings

QUESTION = "What is the total due on this invoice?"


@pytest.fixture(scope="module")
def page(qz):
    doc = open_document(make_pdf(1), dpi=72)
    yield qz._encode_page(doc, 1, VisualBudget(16, 64)).view
    doc.close()


class WorkCounter:
    """Tokens (batch x sequence) each watched module was run on, and how often the vision tower ran."""

    def __init__(self, modules: dict[str, object]):
        self.tokens = Counter()
        self.handles = [module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                        for name, module in modules.items()]

    def _hook(self, name):
        def count(module, args, kwargs):
            if name == "vision":  # its input is pixel patches: count the calls
                self.tokens[name] += 1
                return
            hidden = args[0] if args else next(iter(kwargs.values()))
            self.tokens[name] += hidden.shape[0] * hidden.shape[1]
        return count

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def counted(qz):
    bb = qz.backbone
    adapter = trained_adapter(bb)
    modules = {f"base{i}": layer for i, layer in enumerate(bb.decoder_layers)}
    modules |= {"twig0": adapter.twig_layers[0], "gate0": adapter.high_res_layers[0], "vision": bb.model.model.visual}
    counter = WorkCounter(modules)
    yield ZoomEngine(bb, 2, 2, adapter), counter
    counter.close()


def test_the_zoom_path_replays_only_the_new_suffix(qz, page, counted):
    """Layers 0..K-1 see the coarse prompt once and then only the tokens after the page image;
    layers K..L-1 see the fused sequence once; the page is never encoded again, the region once."""
    engine, counter = counted
    coarse = qz.backbone.build_prompt(QUESTION, [page.grid])
    answer = engine.answer(page, QUESTION, ZoomSettings("always", roi_threshold=0.0), 1)
    assert answer.trace.zoomed and answer.generation.token_ids  # one token: straight from the prefill
    reused = coarse.images[0].stop
    suffix = answer.prompt_tokens - reused
    assert suffix == answer.region_tokens + (coarse.length - reused) + 2  # region block, its two markers, the text
    for layer in (0, 1):
        assert counter.tokens[f"base{layer}"] == coarse.length + suffix
    for layer in (2, 3):
        assert counter.tokens[f"base{layer}"] == answer.prompt_tokens
    assert counter.tokens["twig0"] == coarse.length and counter.tokens["gate0"] == 0
    assert counter.tokens["vision"] == 1  # one call: the region


def test_the_skip_path_costs_the_plain_pass_plus_the_gate_layers(qz, page, counted):
    engine, counter = counted
    plain = qz.backbone.build_prompt(QUESTION, [page.grid]).length
    skipped = engine.answer(page, QUESTION, ZoomSettings("auto", gate_threshold=1.01), 1)
    assert not skipped.trace.zoomed and skipped.trace.skipped_reason == "gate score below threshold"
    assert all(counter.tokens[f"base{i}"] == plain for i in range(4))
    assert counter.tokens["gate0"] == plain
    assert counter.tokens["twig0"] == 0 and counter.tokens["vision"] == 0


def test_decoding_runs_one_token_per_step_over_the_cache(qz, page, counted):
    """After the prefill, every new token goes through each layer alone: nothing is recomputed."""
    engine, counter = counted
    plain = qz.backbone.build_prompt(QUESTION, [page.grid]).length
    answer = engine.answer(page, QUESTION, ZoomSettings("never"), 6)
    steps = len(answer.generation.token_ids) - 1
    assert steps > 0
    assert all(counter.tokens[f"base{i}"] == plain + steps for i in range(4))
