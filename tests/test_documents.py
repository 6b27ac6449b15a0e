import io
import itertools
import struct
import sys

import pymupdf
import pytest
from docmaker import make_encrypted_pdf, make_image, make_pdf, make_tiff
from PIL import Image

from qzoom_cli.documents import detect_kind, open_document, parse_page_spec
from qzoom_cli.errors import (
    FileNotFound,
    ImageCorrupt,
    PageOutOfRange,
    PdfCorrupt,
    PdfEncrypted,
    UnsupportedType,
    UsageError,
)


@pytest.mark.parametrize("fmt,kind", [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp"), ("BMP", "bmp"),
                                      ("GIF", "gif"), ("TIFF", "tiff")])
def test_images_are_detected_by_content_not_name(tmp_path, fmt, kind):
    path = tmp_path / "misleading.pdf"  # the extension lies on purpose
    path.write_bytes(make_image(fmt))
    with open_document(path) as doc:
        assert doc.kind == kind and doc.page_count == 1 and doc.dpi is None
        page = doc.render(1)
        assert page.mode == "RGB" and page.size == (300, 200) == doc.page_size(1)


def test_pdf_pages_render_at_dpi_and_match_page_size():
    with open_document(make_pdf(3), dpi=100) as doc:
        assert (doc.kind, doc.page_count, doc.dpi) == ("pdf", 3, 100)
        for number in (1, 2, 3):
            image = doc.render(number)
            assert image.size == doc.page_size(number)
            assert abs(image.width - 595 * 100 / 72) <= 1 and abs(image.height - 842 * 100 / 72) <= 1


def test_pages_differ_and_rendering_is_deterministic():
    with open_document(make_pdf(2), dpi=50) as doc:
        first, second = doc.render(1), doc.render(2)
        assert first.tobytes() != second.tobytes()
        assert first.tobytes() == doc.render(1).tobytes()


def test_rotated_page_renders_in_its_displayed_orientation():
    with open_document(make_pdf(2, rotate={2: 90}), dpi=72) as doc:
        assert doc.render(1).width < doc.render(1).height
        rotated = doc.render(2)
        assert rotated.width > rotated.height and rotated.size == doc.page_size(2)


def test_encrypted_pdf_needs_the_right_password():
    data = make_encrypted_pdf("s3cret")
    with pytest.raises(PdfEncrypted, match="--password"):
        open_document(data)
    with pytest.raises(PdfEncrypted, match="wrong password"):
        open_document(data, password="nope")
    with open_document(data, password="s3cret") as doc:
        assert doc.page_count == 2 and doc.render(2).size == doc.page_size(2)


def test_garbage_and_truncated_pdfs():
    with pytest.raises(PdfCorrupt):
        open_document(b"%PDF-1.7\nthis is not a pdf body at all")
    data = make_pdf(3)
    with pytest.raises(PdfCorrupt):
        open_document(data[:20])


def test_a_pdf_of_no_pages_and_a_page_that_fails_to_render_are_named(monkeypatch):
    empty = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
             b"trailer<</Root 1 0 R>>\n%%EOF\n")
    with pytest.raises(PdfCorrupt, match="^<bytes> has no readable pages$"):
        open_document(empty)

    def broken(self, *args, **kwargs):
        raise RuntimeError("syntax error in content stream")

    with open_document(make_pdf(3), dpi=72) as doc:
        monkeypatch.setattr(pymupdf.Page, "get_pixmap", broken)
        with pytest.raises(PdfCorrupt, match="^cannot read page 3 of <bytes>: syntax error in content stream$"):
            doc.render(3)


def test_a_display_name_stands_for_the_source_in_the_document_and_its_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(make_image("PNG"))
    with open_document(tmp_path / "a.png", name="scans/a.png") as doc:
        assert doc.source == "scans/a.png"
    with open_document(make_image("PNG")) as doc:
        assert doc.source == "<bytes>"
    with pytest.raises(PdfCorrupt, match="^upload.pdf is not a readable PDF: "):
        open_document(b"%PDF-1.4\ntrailer<<>>\n%%EOF\n", name="upload.pdf")


def test_repaired_pdf_is_flagged_not_hidden():
    data = make_pdf(3)
    outcomes = []
    for cut in range(len(data) // 5, len(data), max(1, len(data) // 40)):
        try:
            with open_document(data[:cut]) as doc:
                outcomes.append(bool(doc.warnings))
        except PdfCorrupt:
            outcomes.append("error")
    # MuPDF either refuses a truncated file or repairs it; a repair must never pass silently.
    assert outcomes and all(o is True or o == "error" for o in outcomes)
    assert True in outcomes


def test_multi_frame_tiff_has_one_page_per_frame():
    sizes = [(120, 80), (90, 60), (40, 50)]
    with open_document(make_tiff(sizes)) as doc:
        assert doc.kind == "tiff" and doc.page_count == 3
        for number, size in enumerate(sizes, start=1):
            page = doc.render(number)
            assert page.size == size == doc.page_size(number)
            assert page.getpixel((5, 5)) == (60 * (number - 1),) * 3


def _palette_png_with_a_transparent_entry() -> bytes:
    image = Image.open(io.BytesIO(make_image("PNG"))).convert("P", palette=Image.Palette.ADAPTIVE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=image.getpixel((299, 199)))  # the background's entry
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animated_image_is_one_page_its_first_frame(fmt):
    """Only TIFF frames are pages; an animation (GIF, WebP, APNG) is read as its first picture."""
    frames = [Image.new("RGB", (40, 30), color) for color in ((250, 250, 250), (0, 0, 0), (250, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 3
    with open_document(buffer.getvalue()) as doc:
        assert doc.page_count == 1 and doc.render(1).getpixel((0, 0)) == (250, 250, 250)


@pytest.mark.parametrize("make", [
    lambda: make_image("PNG", mode="RGBA", color=(0, 0, 0, 0)),
    lambda: make_image("PNG", mode="LA", color=(0, 0)),
    _palette_png_with_a_transparent_entry,
    lambda: make_image("PNG", transparency=(200, 220, 240)),  # a colour key: the background colour
], ids=["alpha", "grey-alpha", "palette", "colour-key"])
def test_transparent_pngs_are_flattened_on_white(make):
    with open_document(make()) as doc:
        page = doc.render(1)
        assert page.getpixel((299, 199)) == (255, 255, 255)  # the transparent background
        assert page.crop((10, 10, 100, 30)).convert("L").getextrema()[0] < 100  # the text drawn on it


def _grey_image(fmt: str, array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, dtype, mode", [
    ("PNG", "<u2", "I;16"), ("TIFF", "<u2", "I;16"), ("TIFF", ">u2", "I;16B"), ("TIFF", "<i4", "I"),
])
def test_sixteen_bit_grey_is_scaled_to_eight_bits(fmt, dtype, mode):
    import numpy as np

    levels = np.array([[0, 256, 40000, 65535]], dtype=dtype)
    data = _grey_image(fmt, levels)
    assert Image.open(io.BytesIO(data)).mode == mode
    with open_document(data) as doc:
        assert [doc.render(1).getpixel((x, 0)) for x in range(4)] == [(v,) * 3 for v in (0, 1, 156, 255)]


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (300, 200), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    with open_document(buffer.getvalue()) as doc:
        assert doc.render(1).size == (200, 300) == doc.page_size(1)


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(make_pdf(2))))
    with open_document("-") as doc:
        assert doc.source == "-" and doc.page_count == 2


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFound):
        open_document(tmp_path / "missing.pdf")
    with pytest.raises(UnsupportedType, match="directory"):
        open_document(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UnsupportedType, match="empty"):
        open_document(tmp_path / "empty.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedType):
        open_document(tmp_path / "notes.txt")
    with pytest.raises(ImageCorrupt):
        open_document(make_image("PNG")[:60])
    with pytest.raises(UsageError, match="^--dpi must be positive$"):
        open_document(make_pdf(1), dpi=0)
    with open_document(make_pdf(1), dpi=1) as doc:  # the least resolution there is
        assert doc.render(1).size == doc.page_size(1) == (9, 12)


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    import qzoom_cli.documents as documents
    from qzoom_cli.errors import InputError

    def refuse(path, mode):
        raise PermissionError(13, "Permission denied", str(path))

    (tmp_path / "secret.pdf").write_bytes(make_pdf(1))
    monkeypatch.setattr(documents, "open", refuse, raising=False)  # root reads any file: refuse it here
    with pytest.raises(InputError, match=f"^permission denied: {tmp_path / 'secret.pdf'}$"):
        open_document(tmp_path / "secret.pdf")


@pytest.mark.parametrize("data, kind", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "png"),
    (b"\xff\xd8\xff\xe0", "jpeg"),
    (b"GIF87a\x01\x00", "gif"),
    (b"GIF89a\x01\x00", "gif"),
    (b"II*\x00\x08\x00", "tiff"),
    (b"MM\x00*\x00\x00", "tiff"),
    (b"II+\x00\x08\x00", "tiff"),  # BigTIFF
    (b"BM\x36\x00", "bmp"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
    (b"%PDF-1.7\n", "pdf"),
    (b"x" * 1019 + b"%PDF-1.4", "pdf"),  # the header may follow junk, ending within the first kilobyte
    (b"\x89PNG\r\n\x1a\n tEXt %PDF-1.4", "png"),  # an image's own bytes may contain a PDF header
])
def test_kinds_are_told_by_their_leading_bytes(data, kind):
    assert detect_kind(data) == kind


@pytest.mark.parametrize("data, message", [
    (b"", "the file is empty"),
    (b"RIFF\x00\x00\x00\x00WAVE", r"not a PDF or a supported image \(PNG, JPEG, WebP, BMP, GIF, TIFF\); "
                                    r"it starts with b'RIFF\\x00\\x00\\x00\\x00'"),
    (b"x" * 1020 + b"%PDF-1.4", "not a PDF"),  # a header ending past the first kilobyte
])
def test_other_bytes_are_refused_by_name(data, message):
    with pytest.raises(UnsupportedType, match=f"^{message}"):
        detect_kind(data)


@pytest.mark.parametrize("spec,count,expected", [
    (None, 3, [1, 2, 3]), ("all", 2, [1, 2]), (" ALL ", 2, [1, 2]), ("", 2, [1, 2]), ("2", 3, [2]),
    ("1-3,7", 9, [1, 2, 3, 7]), ("3-", 5, [3, 4, 5]), ("-2", 5, [1, 2]), (" 2 , 1 ", 3, [2, 1]),
    ("1-2,2-3", 4, [1, 2, 3]), ("3, 1-3", 3, [3, 1, 2]),
])
def test_page_spec(spec, count, expected):
    assert parse_page_spec(spec, count) == expected


@pytest.mark.parametrize("spec,count,error,message", [
    ("0", 3, UsageError, "bad page range '0': pages are numbered from 1"),
    ("1--3", 3, UsageError, "bad page range '1--3': pages are numbered from 1"),
    ("2-0", 3, UsageError, "bad page range '2-0': pages are numbered from 1"),
    ("3-1", 3, UsageError, "bad page range '3-1': 3-1 is empty"),
    ("a", 3, UsageError, "bad page range 'a': use 1-based numbers like '1-3,7'"),
    ("1-x", 3, UsageError, "bad page range '1-x': use 1-based numbers like '1-3,7'"),
    ("1-2-3", 3, UsageError, "bad page range '1-2-3': use 1-based numbers like '1-3,7'"),
    ("4", 3, PageOutOfRange, "page 4 is out of range: the document has 3 pages"),
    ("1,2-9", 3, PageOutOfRange, "page 9 is out of range: the document has 3 pages"),
    ("2", 1, PageOutOfRange, "page 2 is out of range: the document has 1 page"),
])
def test_bad_page_spec(spec, count, error, message):
    with pytest.raises(error) as caught:
        parse_page_spec(spec, count)
    assert str(caught.value) == message


@pytest.mark.parametrize("make", [lambda: make_pdf(2), lambda: make_tiff([(40, 30), (30, 40)])])
def test_pages_outside_the_document_are_out_of_range(make):
    from qzoom_cli.zoom.geometry import Box

    with open_document(make()) as doc:
        reads = (doc.render, doc.page_size, lambda n: doc.render_region(n, Box(0, 0, 10, 10), (10, 10)))
        for read, number in itertools.product(reads, (0, 3)):
            with pytest.raises(PageOutOfRange, match=f"^page {number} is out of range: the document has 2 pages$"):
                read(number)
        assert [read(number) is not None for read in reads for number in (1, 2)] == [True] * 6


def test_thumbnail_is_small_and_keeps_aspect():
    with open_document(make_pdf(1)) as doc:
        thumb = doc.thumbnail(1, max_side=64)
        assert max(thumb.size) <= 64 and thumb.height > thumb.width


def test_pages_rendered_ahead_are_the_same_pages(pdf_path, monkeypatch):
    """Pages asked for ahead are rendered once, in the background, and are the pages themselves."""
    import threading

    from qzoom_cli.documents import Document

    with open_document(pdf_path, dpi=72) as doc:
        expected = [doc.render(n).tobytes() for n in (1, 2, 3)]
        renders, original = [], Document._render
        monkeypatch.setattr(Document, "_render", lambda self, n: renders.append(
            (n, threading.current_thread() is threading.main_thread())) or original(self, n))
        for number in (3, 1, 99, 0):
            doc.render_ahead(number)
        assert sorted(doc._ahead) == [1, 3]
        assert [doc.render(n).tobytes() for n in (1, 2, 3)] == expected
        assert sorted(renders) == [(1, False), (2, True), (3, False)]
        assert not doc._ahead
        doc.render_ahead(2)
    assert not doc._ahead  # closing drops what was never collected


def test_closing_waits_for_the_page_being_rendered_and_cancels_the_rest(pdf_path, monkeypatch):
    """A document closed mid-read-ahead frees nothing under a running render and starts no other."""
    import time

    from qzoom_cli.documents import Document

    started, finished, original = [], [], Document._render

    def slow_render(self, number):
        started.append(number)
        time.sleep(0.3)
        image = original(self, number)
        finished.append(number)
        return image

    monkeypatch.setattr(Document, "_render", slow_render)
    doc = open_document(pdf_path, dpi=72)
    for number in (1, 2, 3):
        doc.render_ahead(number)
    while not started:
        time.sleep(0.01)
    doc.close()
    assert started == finished == [1]


def test_a_pdf_page_too_large_at_the_dpi_asks_for_a_lower_dpi(monkeypatch):
    import qzoom_cli.documents as documents

    monkeypatch.setattr(documents, "MAX_RENDER_PIXELS", 595 * 842)
    with open_document(make_pdf(1), dpi=72) as doc:
        assert doc.render(1).size == (595, 842)  # exactly at the limit
    with open_document(make_pdf(1), dpi=73) as doc, pytest.raises(
            UsageError, match=r"^page 1 at 73 dpi would be 604x854 pixels; lower --dpi$"):
        doc.render(1)


def _first_tiff_directory(data: bytes) -> tuple[list[int], int]:
    """Byte offsets of a little-endian TIFF's first directory entries, and of its next-directory pointer."""
    directory = struct.unpack_from("<I", data, 4)[0]
    end = directory + 2 + 12 * struct.unpack_from("<H", data, directory)[0]
    return list(range(directory + 2, end, 12)), end


def test_a_tiff_whose_frame_chain_is_broken_is_named():
    data = bytearray(make_tiff([(20, 10), (20, 10)]))
    _, next_pointer = _first_tiff_directory(data)
    struct.pack_into("<I", data, next_pointer, len(data) + 1000)  # the second frame lies past the end
    with pytest.raises(ImageCorrupt, match="^cannot count the pages of <bytes>: "):
        open_document(bytes(data))


def test_a_frame_too_large_to_decode_is_refused_by_page(monkeypatch):
    import qzoom_cli.documents as documents

    monkeypatch.setattr(documents, "MAX_RENDER_PIXELS", 40 * 30)
    with open_document(make_tiff([(40, 30), (100, 90)])) as doc:
        assert doc.render(1).size == (40, 30)  # exactly at the limit
        with pytest.raises(ImageCorrupt, match=r"^page 2 of <bytes> is 100x90 pixels, too large to decode safely$"):
            doc.render(2)


def test_an_image_holding_pdf_bytes_is_still_an_image(tmp_path):
    """A PNG whose text chunk (in its first kilobyte) contains `%PDF-` opens as the image it is."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "scanned from %PDF-1.7 original")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (250, 250, 250)).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    assert b"%PDF-" in data[:1024] and detect_kind(data) == "png"
    with open_document(data) as doc:
        assert doc.kind == "png" and doc.render(1).size == (40, 30)


def test_fuzzed_documents_fail_with_named_errors_only():
    """Hundreds of byte-mutated PDFs and images per format (damaged TIFF frames, broken page
    trees, truncations): each opens, or fails with an input error that says what is wrong."""
    from fuzz_documents import fuzz

    failures = fuzz(per_format=300)
    assert not failures, "\n".join(f"{n} x {k[0]} {k[1]}: {k[2]}\n{k[3]}" for k, n in failures.most_common(3))



def test_endless_input_is_capped(monkeypatch, tmp_path):
    import qzoom_cli.documents as documents
    from qzoom_cli.errors import InputError

    monkeypatch.setattr(documents, "MAX_INPUT_BYTES", 2**20)
    with pytest.raises(InputError, match="^/dev/zero is not a regular file"):  # never read: it would not end
        open_document("/dev/zero")
    sparse = tmp_path / "huge.pdf"
    with open(sparse, "wb") as handle:
        handle.truncate(2**40)  # a terabyte on paper: refused by its size, not read
    with pytest.raises(InputError, match=f"^{sparse} is larger than 1 MiB, the most qzoom reads as one document$"):
        open_document(sparse)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"%PDF-" + b"0" * 2**21)))
    with pytest.raises(InputError, match="standard input is larger"):
        open_document("-")


def test_a_file_of_exactly_the_cap_opens(monkeypatch, tmp_path):
    import qzoom_cli.documents as documents

    path = tmp_path / "page.png"
    path.write_bytes(make_image("PNG"))
    monkeypatch.setattr(documents, "MAX_INPUT_BYTES", path.stat().st_size)
    with open_document(path) as doc:
        assert doc.render(1).size == (300, 200)


@pytest.mark.parametrize("size", [(40, 40), (50, 50)])  # over the limit (Pillow warns), over twice it (Pillow raises)
def test_decompression_bombs_are_refused(monkeypatch, size):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageCorrupt, match=r"^cannot decode image <bytes>: .*decompression bomb"):
        open_document(make_image("PNG", size=size))


def test_a_tiff_whose_metadata_is_damaged_still_opens():
    """Pillow warns and skips a tag whose data lies past the end of the file; only bombs are refused."""
    from PIL import TiffImagePlugin

    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[270] = "x" * 100  # an image description long enough to be stored out of line
    data = bytearray(make_image("TIFF", tiffinfo=tags))
    for entry in _first_tiff_directory(data)[0]:
        if struct.unpack_from("<H", data, entry)[0] == 270:
            struct.pack_into("<I", data, entry + 4, 10**6)  # its length now runs past the file
    with pytest.warns(UserWarning, match="Tag data larger than file"):
        Image.open(io.BytesIO(bytes(data))).load()
    with open_document(bytes(data)) as doc:
        assert doc.render(1).size == (300, 200)


@pytest.mark.parametrize("make, kind", [(lambda: make_pdf(3, size=(842, 595)), "pdf"),
                                        (lambda: make_image("PNG", size=(900, 600)), "png")])
def test_thumbnails_are_the_page_itself_scaled_to_fit(make, kind):
    """The panel's thumbnail: the requested page, its aspect kept, its long side `max_side` (a PDF is
    rendered directly at that size and matches the full rendering scaled down)."""
    with open_document(make(), dpi=72) as doc:
        assert doc.kind == kind
        for number in range(1, doc.page_count + 1):
            thumb = doc.thumbnail(number, max_side=60)
            full = doc.render(number)
            assert thumb.mode == "RGB" and max(thumb.size) == 60
            assert abs(thumb.width / thumb.height - full.width / full.height) < 0.05
            scaled = full.resize(thumb.size)
            diff = sum(abs(a - b) for a, b in zip(thumb.convert("L").tobytes(), scaled.convert("L").tobytes()))
            assert diff / (thumb.width * thumb.height) < 12, number  # the same page, not another one
        if doc.page_count > 1:
            assert doc.thumbnail(1, 60).tobytes() != doc.thumbnail(2, 60).tobytes()
        assert max(doc.thumbnail(1).size) == 96  # the default size the panel is drawn for


def test_a_frame_that_does_not_decode_is_named_by_its_page():
    """A TIFF whose second frame's compressed data is damaged: rendering it or reading its size
    (which decodes the upright frame) is an input error naming page 2, every time (PIL would hand
    back the half-decoded frame on a second read); page 1 still reads."""
    frames = [Image.effect_noise((64, 64), 40).convert("RGB") for _ in range(2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    data = bytearray(buffer.getvalue())
    with Image.open(io.BytesIO(bytes(data))) as tiff:
        tiff.seek(1)
        [start], [length] = tiff.tag_v2[273], tiff.tag_v2[279]  # the second frame's strip
    data[start + 2:start + length - 2] = b"\xab" * (length - 4)
    with open_document(bytes(data)) as doc:
        assert doc.page_size(1) == (64, 64)
        for read in (doc.render, doc.page_size, doc.render):
            with pytest.raises(ImageCorrupt, match=r"^cannot read page 2 of <bytes>: decoder error"):
                read(2)
        assert doc.render(1).size == (64, 64)


def test_a_page_of_enormous_user_units_is_refused_before_a_pixel_is_allocated(tmp_path):
    """/UserUnit 1000000 makes a letter page 612 million points wide: its render and size are
    refused by arithmetic, and its thumbnail is drawn at thumbnail size, not the page's."""
    import time

    from docmaker import make_raw_pdf

    from qzoom_cli.errors import TooLarge

    start = time.monotonic()
    with open_document(make_raw_pdf("/UserUnit 1000000"), dpi=200) as doc:
        for read in (doc.render, doc.page_size):
            with pytest.raises(TooLarge, match=r"^page 1 of <bytes> is 612000000x792000000 points, "
                                               r"1700000000x2200000000 pixels at 200 dpi: more than qzoom renders$"):
                read(1)
        assert max(doc.thumbnail(1).size) == 96
    assert time.monotonic() - start < 20  # a render of the page would take minutes (and gigabytes)
    with open_document(make_raw_pdf(), dpi=72) as plain:
        assert plain.page_size(1) == (612, 792)


def test_a_pdf_whose_page_count_lies_is_corrupt_not_an_internal_error():
    from docmaker import make_raw_pdf

    with pytest.raises(PdfCorrupt, match=r"^<bytes> has a damaged page tree: code=7: Invalid number of pages$"):
        open_document(make_raw_pdf(count=5))


def test_pipes_and_devices_are_refused_not_waited_on(tmp_path, monkeypatch):
    import os

    from qzoom_cli.errors import InputError, UnsupportedType

    fifo = tmp_path / "doc.pdf"
    os.mkfifo(fifo)  # nobody writes it: opening it to read would wait forever
    with pytest.raises(UnsupportedType, match=f"^{fifo} is not a regular file \\(a pipe, socket or device\\); save "
                                              "the document to a file, or pipe it into '-'$"):
        open_document(fifo)
    monkeypatch.setattr(sys, "stdin", None)  # started with fd 0 closed
    with pytest.raises(InputError, match="^standard input is closed: pipe the document into '-', or name its file$"):
        open_document("-")


def test_an_image_whose_damage_raises_anything_is_named():
    """Pillow reads a PNG's iCCP chunk after the pixels and raises IndexError on an empty profile."""
    from docmaker import with_png_chunk

    with pytest.raises(ImageCorrupt, match=r"^cannot decode image <bytes>: IndexError: "):
        open_document(with_png_chunk(make_image("PNG"), b"iCCP", b"n\x00"))
