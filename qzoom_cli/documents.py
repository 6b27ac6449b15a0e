"""Documents in, page images out.

A document is read once into memory (so its hash is known and stdin works like a file), its
type is told from its first bytes rather than its name, and its pages are rendered one at a
time on demand so a long PDF never sits in memory as images.
"""

from __future__ import annotations

import hashlib
import io
import stat
import sys
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pymupdf
from PIL import Image, ImageOps

from .budget import bicubic
from .errors import (
    FileNotFound,
    ImageCorrupt,
    InputError,
    PageOutOfRange,
    PdfCorrupt,
    PdfEncrypted,
    QZoomError,
    TooLarge,
    UnsupportedType,
    UsageError,
)

STDIN = "-"
DEFAULT_DPI = 200
MAX_RENDER_PIXELS = 120_000_000
MAX_RENDER_SIDE = 1_000_000  # pixels a side: MuPDF clamps page sizes at 2**24, far beyond any real page
MAX_INPUT_BYTES = 2**30
MAX_REGION_DPI = 1200
IMAGE_KINDS = ("png", "jpeg", "webp", "bmp", "gif", "tiff")

# MuPDF would print its own diagnostics to stderr; qzoom reports problems itself, once.
pymupdf.TOOLS.mupdf_display_errors(False)
pymupdf.TOOLS.mupdf_display_warnings(False)


def detect_kind(data: bytes) -> str:
    """'pdf' or one of IMAGE_KINDS, from the leading bytes; raises UnsupportedType otherwise."""
    if not data:
        raise UnsupportedType("the file is empty")
    signatures = (
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"\xff\xd8\xff", "jpeg"),
        (b"GIF87a", "gif"),
        (b"GIF89a", "gif"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"II+\x00", "tiff"),
        (b"BM", "bmp"),
    )
    for magic, kind in signatures:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if b"%PDF-" in data[:1024]:  # after the image signatures: an image's text chunk may hold these bytes
        return "pdf"
    raise UnsupportedType(
        f"not a PDF or a supported image (PNG, JPEG, WebP, BMP, GIF, TIFF); it starts with {data[:8]!r}"
    )


def _out_of_range(number: int, page_count: int) -> PageOutOfRange:
    return PageOutOfRange(f"page {number} is out of range: the document has {page_count} "
                          f"{'page' if page_count == 1 else 'pages'}")


def parse_page_spec(spec: str | None, page_count: int) -> list[int]:
    """'1-3,7' -> [1, 2, 3, 7]: 1-based, inclusive, open ends ('5-', '-3'), order kept, no repeats."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(1, page_count + 1))
    pages: list[int] = []
    for lo, hi in check_page_spec(spec):
        hi = page_count if hi is None else hi
        if lo > hi:
            raise UsageError(f"bad page range {spec!r}: {lo}-{hi} is empty")
        if hi > page_count:
            raise _out_of_range(hi, page_count)
        pages.extend(p for p in range(lo, hi + 1) if p not in pages)
    return pages


def format_pages(pages: list[int]) -> str:
    """Page numbers as a page spec reads them: [1, 2, 3, 7] -> '1-3,7' (runs in the order given)."""
    runs: list[list[int]] = []
    for page in pages:
        if runs and page == runs[-1][-1] + 1:
            runs[-1].append(page)
        else:
            runs.append([page])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def check_page_spec(spec: str | None) -> list[tuple[int, int | None]]:
    """The (first, last) page ranges a spec names (last None: to the end), its syntax checked
    before any document is read."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return []
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo_text, _, hi_text = part.partition("-")
                lo, hi = int(lo_text) if lo_text else 1, int(hi_text) if hi_text else None
            else:
                lo = hi = int(part)
        except ValueError:
            raise UsageError(f"bad page range {spec!r}: use 1-based numbers like '1-3,7'") from None
        if lo < 1 or (hi is not None and hi < 1):
            raise UsageError(f"bad page range {spec!r}: pages are numbered from 1")
        if hi is not None and lo > hi:
            raise UsageError(f"bad page range {spec!r}: {lo}-{hi} is empty")
        ranges.append((lo, hi))
    return ranges


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency (alpha, a transparent palette entry or colour key) flattened onto white:
    a transparent PNG must not turn black."""
    if image.mode == "I" or image.mode.startswith("I;16"):  # 16- or 32-bit grey: scaled, not clipped, to 8 bits
        image = image.convert("I").point(lambda v: v / 256)
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, "white")  # pragma: no mutate (colour names ignore case)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


@dataclass
class Document:
    """An opened document: its pages can be rendered, by 1-based number, at a chosen DPI."""

    source: str
    kind: str
    sha256: str
    page_count: int
    dpi: int | None
    warnings: list[str] = field(default_factory=list)
    _pdf: pymupdf.Document | None = field(default=None, repr=False)
    _image: Image.Image | None = field(default=None, repr=False)
    # MuPDF and PIL objects are not thread-safe: every read of the source holds the lock
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _renderer: ThreadPoolExecutor | None = field(default=None, repr=False)
    _ahead: dict[int, Future] = field(default_factory=dict, repr=False)
    _damaged: dict[int, QZoomError] = field(default_factory=dict, repr=False)

    def _check(self, number: int) -> None:
        if not 1 <= number <= self.page_count:
            raise _out_of_range(number, self.page_count)

    @contextmanager
    def _reading(self, number: int) -> Iterator[None]:
        """Hold the lock while reading the source, and name a damaged page as such: MuPDF raises
        its own error types, PIL anything from OSError to TypeError on broken TIFF frames. A page
        that failed once fails again: PIL would hand back the half-decoded frame the second time."""
        with self._lock:
            if number in self._damaged:
                raise self._damaged[number]
            try:
                yield
            except QZoomError:
                raise
            except Exception as exc:
                kind = PdfCorrupt if self._pdf is not None else ImageCorrupt
                self._damaged[number] = kind(f"cannot read page {number} of {self.source}: {exc}")
                raise self._damaged[number] from exc

    def page_size(self, number: int) -> tuple[int, int]:
        """(width, height) in page pixels: the coordinate space every box qzoom reports lives in."""
        self._check(number)
        with self._reading(number):
            if self._pdf is not None:
                scale = self.dpi / 72
                rect = self._pdf[number - 1].rect
                if max(rect.width, rect.height) * scale > MAX_RENDER_SIDE:  # beyond MuPDF's clamped sizes
                    raise TooLarge(f"page {number} of {self.source} is {rect.width:.0f}x{rect.height:.0f} points, "
                                   f"{rect.width * scale:.0f}x{rect.height * scale:.0f} pixels at {self.dpi} dpi: "
                                   "more than qzoom renders")
                box = (rect * pymupdf.Matrix(scale, scale)).irect
                return box.width, box.height
            return self._frame(number).size

    def _frame(self, number: int) -> Image.Image:
        """Image frame `number`, upright; a later TIFF frame gets the same size guard as the first."""
        self._image.seek(number - 1)
        if self._image.width * self._image.height > MAX_RENDER_PIXELS:
            raise ImageCorrupt(f"page {number} of {self.source} is {self._image.width}x{self._image.height} "
                               "pixels, too large to decode safely")
        return ImageOps.exif_transpose(self._image)

    def render(self, number: int) -> Image.Image:
        """Page `number` as an RGB image; PDFs at the document's DPI (page rotation applied).
        A page asked for with `render_ahead` comes from that render (its errors raise here)."""
        self._check(number)
        ahead = self._ahead.pop(number, None)
        return ahead.result() if ahead is not None else self._render(number)

    def render_ahead(self, number: int) -> None:
        """Start rendering page `number` in a worker thread, so it is ready when the model, which
        mostly waits on the GPU meanwhile, is done with the current page; `render(number)` collects it."""
        if 1 <= number <= self.page_count and number not in self._ahead:
            if self._renderer is None:
                self._renderer = ThreadPoolExecutor(1, "qzoom-render")  # pragma: no mutate (reads hold the lock)
            self._ahead[number] = self._renderer.submit(self._render, number)

    def _render(self, number: int) -> Image.Image:
        with self._reading(number):
            if self._pdf is None:
                return _to_rgb(self._frame(number))
            width, height = self.page_size(number)
            if width * height > MAX_RENDER_PIXELS:
                raise UsageError(f"page {number} at {self.dpi} dpi would be {width}x{height} pixels; lower --dpi")
            return self._pdf_image(number, self.dpi / 72)

    def _pdf_image(self, number: int, zoom: float, clip: pymupdf.Rect | None = None) -> Image.Image:
        """PDF page `number` (or its `clip`, in points) rendered at `zoom` x 72 dpi: its size measured
        from the page itself (MuPDF clamps the sizes it reports), refused before a pixel is allocated
        when it is beyond what qzoom renders."""
        with self._reading(number):
            page = self._pdf[number - 1]
            area = page.rect if clip is None else clip & page.rect
            width, height = area.width * zoom, area.height * zoom
            if width * height > MAX_RENDER_PIXELS or max(width, height) > MAX_RENDER_SIDE:
                raise TooLarge(f"page {number} of {self.source} would render at {width:.0f}x{height:.0f} pixels, "
                               f"more than qzoom renders ({MAX_RENDER_PIXELS:,} pixels)")
            pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), clip=clip)
        return Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)

    @property
    def coord_space(self) -> str:
        """How boxes on this document's pages are measured, as reported in results."""
        return f"page_px@{self.dpi}dpi" if self._pdf is not None else "page_px"

    def render_region(self, number: int, box, size: tuple[int, int]) -> Image.Image:
        """The page-pixel `box` (x0, y0, x1, y1) as an RGB image of exactly `size` (w, h).

        PDFs re-render just that clip at the resolution `size` needs, so vector text stays sharp
        however far the region is magnified; images are cropped from their original pixels.
        """
        self._check(number)
        x0, y0, x1, y1 = (float(v) for v in box.as_list())
        if self._pdf is None:
            region = self._render(number).crop((int(x0), int(y0), int(x1), int(y1)))
        else:
            points = 72 / self.dpi
            clip = pymupdf.Rect(x0 * points, y0 * points, x1 * points, y1 * points)
            zoom = min(max(size[0] / (x1 - x0), size[1] / (y1 - y0)) * self.dpi / 72, MAX_REGION_DPI / 72)
            region = self._pdf_image(number, zoom, clip)
        return bicubic(region, size)

    def page_pixels(self, number: int, box) -> Image.Image:
        """The page-pixel `box` (x0, y0, x1, y1, truncated to integers) cut from the page as `render`
        shows it: its own pixels, no resampling (PDFs at the document's DPI)."""
        self._check(number)
        x0, y0, x1, y1 = (int(v) for v in box.as_list())
        return self._render(number).crop((x0, y0, x1, y1))

    def thumbnail(self, number: int, max_side: int = 96) -> Image.Image:
        """A small RGB picture of a page, its long side `max_side`; PDFs are rendered directly at that size."""
        if self._pdf is not None:
            self._check(number)
            with self._reading(number):
                rect = self._pdf[number - 1].rect  # in points, as the render measures it
            return self._pdf_image(number, max_side / max(rect.width, rect.height, 1e-6))
        image = self._render(number)
        image.thumbnail((max_side, max_side))
        return image

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.shutdown(cancel_futures=True)  # and waits for the page being rendered
            self._ahead.clear()
        if self._pdf is not None:
            self._pdf.close()
        if self._image is not None:
            self._image.close()

    def __enter__(self) -> Document:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_source(source: str | Path | bytes, shown: str | None = None) -> tuple[str, bytes]:
    """(display name, bytes) of a path, '-' for standard input, or raw bytes; `shown` is what error
    messages call a path instead of itself (a service names what the request sent, not its own paths)."""
    if isinstance(source, bytes):
        return "<bytes>", source
    name = str(source)
    if name == STDIN:
        if sys.stdin is None:  # fd 0 closed
            raise InputError("standard input is closed: pipe the document into '-', or name its file")
        return STDIN, _capped(sys.stdin.buffer, "standard input")
    path, shown = Path(name), shown or name
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFound(f"no such file: {shown}") from None
    except OSError as exc:  # a name too long, a loop of links, a folder that may not be read
        raise InputError(f"cannot read {shown}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UnsupportedType(f"{shown} is a directory, not a document")
    if not stat.S_ISREG(info.st_mode):  # a pipe with no writer would wait forever, a device never end
        raise UnsupportedType(f"{shown} is not a regular file (a pipe, socket or device); save the document to a "
                              "file, or pipe it into '-'")
    if info.st_size > MAX_INPUT_BYTES:  # refused by its size, before a byte is read
        raise InputError(f"{shown} is larger than {MAX_INPUT_BYTES // 2**20} MiB, the most qzoom reads as one document")
    try:
        with open(path, "rb") as stream:
            return name, _capped(stream, shown)
    except PermissionError:
        raise InputError(f"permission denied: {shown}") from None


def _capped(stream, name: str) -> bytes:
    """At most MAX_INPUT_BYTES of `stream`: /dev/zero or an endless pipe must not fill the memory."""
    data = stream.read(MAX_INPUT_BYTES + 1)  # pragma: no mutate (a byte more tells the same files apart)
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"{name} is larger than {MAX_INPUT_BYTES // 2**20} MiB, the most qzoom reads as one document")
    return data


def open_document(source: str | Path | bytes, *, password: str | None = None, dpi: int = DEFAULT_DPI,
                  name: str | None = None) -> Document:
    """Open a PDF or image from a path, '-' (stdin) or bytes; raises InputError subclasses.
    `name` is what records and messages call it instead (an upload's file name, say)."""
    if dpi < 1:
        raise UsageError("--dpi must be positive")
    read_as, data = read_source(source, name)
    name = name or read_as
    kind = detect_kind(data)
    digest = hashlib.sha256(data).hexdigest()
    if kind == "pdf":
        pdf = _open_pdf(name, data, password)
        notes = [f"{name} is damaged; MuPDF repaired it and some content may be missing"] if pdf.is_repaired else []
        return Document(name, kind, digest, pdf.page_count, dpi, notes, _pdf=pdf)
    image = _open_image(name, data)
    try:
        frames = image.n_frames if kind == "tiff" else 1
    except Exception as exc:  # PIL walks every frame's header to count them
        raise ImageCorrupt(f"cannot count the pages of {name}: {exc}") from exc
    return Document(name, kind, digest, frames, None, _image=image)


def _open_pdf(name: str, data: bytes, password: str | None) -> pymupdf.Document:
    try:
        pdf = pymupdf.open(stream=data, filetype="pdf")  # pragma: no mutate (MuPDF reads a bare stream as PDF too)
    except Exception as exc:  # pymupdf.FileDataError and friends
        raise PdfCorrupt(f"{name} is not a readable PDF: {exc}") from exc
    if pdf.needs_pass:
        if password is None:
            raise PdfEncrypted(f"{name} is encrypted: pass its password with --password")
        if not pdf.authenticate(password):
            raise PdfEncrypted(f"wrong password for {name}")
    try:
        pages = pdf.page_count
    except Exception as exc:  # a page tree that lies about its size (MuPDF code=7)
        raise PdfCorrupt(f"{name} has a damaged page tree: {exc}") from exc
    if pages == 0:
        raise PdfCorrupt(f"{name} has no readable pages")
    return pdf


def _open_image(name: str, data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except Exception as exc:  # a damaged image raises anything from OSError to IndexError (a PNG iCCP chunk)
        raise ImageCorrupt(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc
    return image

