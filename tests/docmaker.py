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


def make_raw_pdf(page: str = "", count: int = 1) -> bytes:
    """A one-page PDF written by hand, so that it may say what a PDF library would not write: a
    page dictionary with `page` added (`/UserUnit 1000000`), a page tree whose /Count lies."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [3 0 R] /Count {count} >>",
               f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] {page} /Contents 4 0 R >>",
               "<< /Length 44 >>\nstream\nBT /F1 12 Tf 72 712 Td (Hello) Tj ET\nendstream"]
    out, offsets = b"%PDF-1.6\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    return out + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


def with_png_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """`png` with one more chunk just before its end (where ancillary chunks are read at load time)."""
    import struct
    import zlib

    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return png[:-12] + chunk + png[-12:]
