"""Shared fixtures: everything offline, one tiny checkpoint and one loaded model per session."""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("QZOOM_DEVICE", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from qzoom_cli.testing import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl")


@pytest.fixture(scope="session")
def qz(tiny_dir):
    from qzoom_cli import QZoom

    return QZoom.from_pretrained(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def page_image():
    """The first page of the test invoice at 72 dpi, as the families' tests read it."""
    from docmaker import make_pdf

    from qzoom_cli.documents import open_document

    with open_document(make_pdf(1), dpi=72) as doc:
        return doc.render(1)


@pytest.fixture
def pdf_path(tmp_path):
    from docmaker import make_pdf

    path = tmp_path / "doc.pdf"
    path.write_bytes(make_pdf(3))
    return path


def pytest_collection_modifyitems(items):
    """Under `mutmut run` (cwd mutants/), fastest tests first: a killed mutant stops at its first failure."""
    stats = Path("mutmut-stats.json")
    if os.environ.get("MUTANT_UNDER_TEST") and stats.exists():
        duration = json.loads(stats.read_text())["duration_by_test"]
        items.sort(key=lambda item: duration.get(item.nodeid, 0.0))
