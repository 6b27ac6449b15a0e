"""Documents generated on the fly for the tests: PDFs (plain, rotated, encrypted) and images."""

from __future__ import annotations

import io

import pymupdf
from PIL import Image, ImageDraw


def make_pdf(pages: int = 3, rotate: dict[int, int] | None = None, size=(595, 842), **save) -> bytes:
    doc = pymupdf.open()
    for i in range(pages):
        doc.new_page(width=size[0], height=size[1])
    for i in range(pages):
        page = doc[i]
        page.insert_text((72, 100 + 40 * i), f"Page {i + 1}: total due ${100 * (i + 1)}.00", fontsize=18)
        page.draw_rect(pymupdf.Rect(60, 60, 300, 140), color=(1, 0, 0))
        if rotate and i + 1 in rotate:
            page.set_rotation(rotate[i + 1])
    return doc.tobytes(**save)


def make_encrypted_pdf(password: str = "s3cret") -> bytes:
    return make_pdf(2, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=password, owner_pw="owner-" + password)


def make_image(fmt: str, size=(300, 200), mode="RGB", color=(200, 220, 240), **save) -> bytes:
    image = Image.new(mode, size, color)
    ImageDraw.Draw(image).text((10, 10), "TOTAL 42.00", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def make_tiff(frames: list[tuple[int, int]]) -> bytes:
    """A multi-frame TIFF, one solid grey frame per (width, height), shades 0, 60, 120..."""
    images = [Image.new("L", size, 60 * i % 256).convert("RGB") for i, size in enumerate(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="TIFF", save_all=True, append_images=images[1:])
    return buffer.getvalue()
