"""Byte-mutated documents through the loader: every outcome is a page or a named input error.

    python tests/fuzz_documents.py 5000        # a longer run than the test suite's, per format

`test_documents.py` runs the same harness on a few hundred mutations per format.
"""

from __future__ import annotations

import random
import sys
import traceback
import warnings
import zlib
from collections import Counter

from docmaker import make_image, make_pdf, make_raw_pdf, make_tiff, with_png_chunk

from qzoom_cli.documents import open_document
from qzoom_cli.errors import QZoomError


def seeds() -> dict[str, bytes]:
    """One document per format, and ones whose parts the trials found fragile: a hand-written PDF
    (page units, page tree), a PNG carrying a colour profile."""
    return {"pdf": make_pdf(2), "png": make_image("PNG"), "jpeg": make_image("JPEG"), "gif": make_image("GIF"),
            "bmp": make_image("BMP"), "webp": make_image("WEBP"), "tiff": make_tiff([(60, 40), (30, 50), (20, 20)]),
            "raw-pdf": make_raw_pdf("/UserUnit 2"),
            "png-iccp": with_png_chunk(make_image("PNG"), b"iCCP", b"sRGB\x00\x00" + zlib.compress(b"profile" * 20))}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A few random byte changes, deletions or a truncation."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not out:
            break
        position, choice = rng.randrange(len(out)), rng.random()
        if choice < 0.6:
            out[position] = rng.randrange(256)
        elif choice < 0.8:
            del out[position:position + rng.randint(1, 64)]
        else:
            del out[position:]
    return bytes(out)


def read_everything(data: bytes) -> None:
    """Open, measure and render every page, as `qzoom ask` would, and draw its page-picker thumbnail."""
    with open_document(data, dpi=36) as doc:
        for number in range(1, doc.page_count + 1):
            doc.page_size(number)
            doc.render(number)
            doc.thumbnail(number)


def fuzz(per_format: int, seed: int = 0) -> Counter:
    """Uncaught (non-QZoomError) failures by (format, exception type, message start)."""
    rng, failures = random.Random(seed), Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's notes about damaged EXIF and the like
        for kind, data in seeds().items():
            for _ in range(per_format):
                try:
                    read_everything(mutate(data, rng))
                except QZoomError:
                    pass
                except Exception as exc:
                    failures[(kind, type(exc).__name__, str(exc)[:80], traceback.format_exc(limit=-1))] += 1
    return failures


if __name__ == "__main__":
    found = fuzz(int(sys.argv[1]) if len(sys.argv) > 1 else 2000, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    for (kind, name, message, where), count in found.most_common():
        print(f"{count:6d} {kind} {name}: {message}\n{where}")
    print(f"{sum(found.values())} uncaught failures")
    sys.exit(1 if found else 0)
