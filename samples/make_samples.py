"""Regenerate the sample documents: `python samples/make_samples.py` (deterministic output).

invoice.pdf  - a three-page vector invoice: header, 26 line items in small type across two
               pages, totals on page 2, payment instructions on page 3.
receipt.png  - a scanned-looking till receipt: grey paper, slight skew, sensor noise.
questions.jsonl - questions about both, with reference answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pymupdf
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).parent
A4 = (595, 842)

ITEMS = [
    ("Aluminium rail 2 m", 14, 18.40), ("Corner bracket, steel", 120, 0.85), ("M6 hex bolt (box of 100)", 6, 9.90),
    ("M6 lock nut (box of 100)", 6, 7.25), ("Mounting plate 200x200", 10, 12.60), ("Cable duct 40x60, 2 m", 25, 6.15),
    ("DIN rail 35 mm, 1 m", 18, 4.30), ("Terminal block 4 mm2", 240, 0.62), ("End stop clamp", 60, 0.48),
    ("Label strip, white", 12, 2.10), ("Circuit breaker C16", 16, 11.75), ("RCD 40A 30mA", 4, 48.90),
    ("Contactor 24V AC", 8, 22.40), ("Control relay 2CO", 20, 6.80), ("Power supply 24V 5A", 3, 64.00),
    ("Pushbutton green", 10, 5.35), ("Pushbutton red", 10, 5.35), ("Emergency stop", 4, 19.90),
    ("Pilot lamp 24V", 12, 4.45), ("Enclosure 600x400x200", 2, 189.00), ("Cable gland M20", 50, 0.95),
    ("Flexible cable 3G1.5, 50 m", 3, 57.50), ("Wire ferrules (500)", 4, 8.20), ("Heat shrink assortment", 2, 14.30),
    ("Installation labour (hours)", 12, 58.00), ("Delivery and packaging", 1, 35.00),
]
TAX_RATE = 0.20


def _money(value: float) -> str:
    return f"${value:,.2f}"


def make_invoice(path: Path) -> dict:
    doc = pymupdf.open()
    subtotal = sum(q * p for _, q, p in ITEMS)
    tax = round(subtotal * TAX_RATE, 2)
    total = subtotal + tax
    for _ in range(3):
        doc.new_page(width=A4[0], height=A4[1])
    pages = [doc[i] for i in range(3)]
    for number, page in enumerate(pages, start=1):
        page.insert_text((50, 60), "NORTHWIND ELECTRICAL SUPPLY LTD", fontsize=16, fontname="hebo")
        page.insert_text((50, 76), "14 Harbour Road, Bristol BS1 5TT  ·  VAT GB 284 1193 52", fontsize=8)
        page.insert_text((480, 60), "INVOICE", fontsize=16, fontname="hebo")
        page.insert_text((250, 815), f"Page {number} of 3", fontsize=8)
    first = pages[0]
    for i, (label, value) in enumerate([("Invoice number", "INV-2024-0815"), ("Invoice date", "12 March 2024"),
                                        ("Due date", "11 April 2024"), ("Customer ID", "C-40417")]):
        first.insert_text((380, 100 + 14 * i), f"{label}:", fontsize=9)
        first.insert_text((470, 100 + 14 * i), value, fontsize=9, fontname="hebo")
    first.insert_text((50, 110), "Bill to:", fontsize=9, fontname="hebo")
    for i, line in enumerate(["Harlow Automation GmbH", "Attn: Accounts Payable", "Werkstrasse 9",
                              "70565 Stuttgart, Germany"]):
        first.insert_text((50, 124 + 12 * i), line, fontsize=9)

    def table(page, rows, top):
        page.draw_rect(pymupdf.Rect(48, top - 12, 547, top + 4), color=(0, 0, 0), fill=(0.9, 0.9, 0.9))
        for x, head in ((52, "#"), (72, "Description"), (360, "Qty"), (410, "Unit price"), (490, "Amount")):
            page.insert_text((x, top), head, fontsize=8, fontname="hebo")
        y = top
        for index, (label, qty, price) in rows:
            y += 15
            page.insert_text((52, y), str(index), fontsize=7)
            page.insert_text((72, y), label, fontsize=7)
            page.insert_text((360, y), str(qty), fontsize=7)
            page.insert_text((410, y), _money(price), fontsize=7)
            page.insert_text((490, y), _money(qty * price), fontsize=7)
            page.draw_line((48, y + 4), (547, y + 4), color=(0.8, 0.8, 0.8), width=0.5)
        return y

    numbered = list(enumerate(ITEMS, start=1))
    table(first, numbered[:18], 200)
    second = pages[1]
    y = table(second, numbered[18:], 110) + 40
    for i, (label, value) in enumerate([("Subtotal", _money(subtotal)), (f"VAT {TAX_RATE:.0%}", _money(tax)),
                                        ("Total due", _money(total))]):
        font = "hebo" if label == "Total due" else "helv"
        second.insert_text((400, y + 16 * i), label, fontsize=9, fontname=font)
        second.insert_text((490, y + 16 * i), value, fontsize=9, fontname=font)
    third = pages[2]
    for i, line in enumerate([
        "Payment terms: 30 days net. Late payments accrue interest at 1.5% per month.",
        "Please pay by bank transfer quoting the invoice number as reference.",
        "Bank: Westbridge Commercial Bank, Bristol",
        "Account name: Northwind Electrical Supply Ltd",
        "IBAN: GB29 WBCB 6016 1331 9268 19    BIC: WBCBGB2L",
        "Questions about this invoice: accounts@northwind-electrical.example, +44 117 496 0321",
    ]):
        third.insert_text((50, 110 + 18 * i), line, fontsize=9)
    doc.set_metadata({"title": "Invoice INV-2024-0815", "creator": "qzoom samples"})
    doc.save(path, garbage=4, deflate=True, no_new_id=True)
    return {"subtotal": subtotal, "tax": tax, "total": total}


def make_receipt(path: Path) -> None:
    rng = random.Random(7)
    width, height = 520, 1040
    paper = Image.new("L", (width, height), 236)
    draw = ImageDraw.Draw(paper)
    big, small = ImageFont.load_default(size=30), ImageFont.load_default(size=21)
    lines = [("CORNER MARKET", "", big), ("221 Elm Street, Springfield", "", small), ("Tel 555-0142", "", small),
             ("", "", small), ("2024-05-03  18:42   Till 3", "", small), ("Cashier: DANA", "", small), ("", "", small)]
    basket = [("Whole milk 2L", 2.49), ("Sourdough loaf", 3.80), ("Free-range eggs x12", 4.25),
              ("Bananas 1.2kg", 1.44), ("Cheddar 400g", 5.10), ("Coffee beans 1kg", 13.99), ("Dish soap", 2.35)]
    lines += [(name, f"{price:.2f}", small) for name, price in basket]
    total = sum(price for _, price in basket)
    lines += [("", "", small), ("TOTAL", f"{total:.2f}", big), ("CARD", f"{total:.2f}", small),
              ("", "", small), ("Thank you for shopping!", "", small)]
    y = 40
    for left, right, font in lines:
        draw.text((36, y), left, fill=25, font=font)
        if right:
            draw.text((width - 40 - draw.textlength(right, font=font), y), right, fill=25, font=font)
        y += 44 if font is big else 34
    noisy = paper.point(lambda v: v)
    pixels = noisy.load()
    for _ in range(width * height // 12):
        x, yy = rng.randrange(width), rng.randrange(height)
        pixels[x, yy] = max(0, min(255, pixels[x, yy] + rng.randint(-40, 40)))
    scan = noisy.filter(ImageFilter.GaussianBlur(0.6)).rotate(-1.8, resample=Image.Resampling.BICUBIC,
                                                              expand=True, fillcolor=250)
    scan.save(path, optimize=True)


def main() -> None:
    amounts = make_invoice(HERE / "invoice.pdf")
    make_receipt(HERE / "receipt.png")
    rows = [
        {"id": "inv-total", "file": "invoice.pdf", "question": "What is the total due?",
         "answers": [_money(amounts["total"])]},
        {"id": "inv-number", "file": "invoice.pdf", "question": "What is the invoice number?",
         "answers": ["INV-2024-0815"]},
        {"id": "inv-due", "file": "invoice.pdf", "question": "When is the invoice due?",
         "answers": ["11 April 2024"]},
        {"id": "inv-rcd", "file": "invoice.pdf", "question": "What is the unit price of the RCD 40A 30mA?",
         "answers": ["$48.90"]},
        {"id": "inv-iban", "file": "invoice.pdf", "pages": "3", "question": "What is the IBAN?",
         "answers": ["GB29 WBCB 6016 1331 9268 19"]},
        {"id": "rcpt-total", "file": "receipt.png", "question": "What is the total on the receipt?",
         "answers": ["33.42"]},
        {"id": "rcpt-coffee", "file": "receipt.png", "question": "How much did the coffee beans cost?",
         "answers": ["13.99"]},
        {"id": "rcpt-date", "file": "receipt.png", "question": "On what date was this receipt printed?",
         "answers": ["2024-05-03"]},
    ]
    with open(HERE / "questions.jsonl", "w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
