"""Pictures and the page of ``sslt localize``: heatmap overlays with a colour bar and time stamp, contact sheets,
the map-maximum-over-time plot (SVG) and ``index.html``, which works opened as a file (no server, no script from
elsewhere).
"""
from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any, Sequence

import numpy as np

BAR_WIDTH = 72  # the colour bar panel right of each picture (even, for H.264)
ALPHA = 0.45
SHEET_COLUMNS = 4


@functools.lru_cache(maxsize=1)
def _jet() -> np.ndarray:
    """(256, 3) uint8 RGB lookup table of the jet colour map (the one sslt eval's gallery uses)."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).round().astype(np.uint8)


def display_size(width: int, height: int, longer: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``longer``, both even."""
    scale = longer / max(width, height)
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def overlay(picture: np.ndarray, heat: np.ndarray, peak: tuple[float, float], low: float, high: float,
            caption: str) -> np.ndarray:
    """The picture with the heatmap blended over it, the peak marked, a caption and a colour bar on the right.

    picture: (H, W, 3) uint8; heat: (H, W) in [0, 1] (the map min-max normalised, upsampled to the picture);
    peak: normalised (x, y); low / high: the map's minimum and maximum cosine, written at the bar's ends.
    Returns (H, W + BAR_WIDTH, 3) uint8.
    """
    from PIL import Image, ImageDraw

    h, w = picture.shape[:2]
    colours = _jet()[np.clip((heat * 255.0).round(), 0, 255).astype(np.intp)]
    blended = (picture.astype(np.float32) * (1 - ALPHA) + colours.astype(np.float32) * ALPHA).round()
    canvas = np.zeros((h, w + BAR_WIDTH, 3), np.uint8)
    canvas[:, :w] = blended.astype(np.uint8)
    top, bottom = 14, h - 14
    ramp = np.linspace(255, 0, max(1, bottom - top)).round().astype(np.intp)
    canvas[top:bottom, w + 6:w + 20] = _jet()[ramp][:, None, :]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    small = _font(max(9, h // 26))
    draw.text((w + 24, top - 4), f"{high:.2f}", fill=(255, 255, 255), font=small)
    draw.text((w + 24, bottom - 10), f"{low:.2f}", fill=(255, 255, 255), font=small)
    draw.text((w + 24, (top + bottom) // 2 - 6), "cos", fill=(200, 200, 200), font=small)
    px, py = peak[0] * w, peak[1] * h
    draw.line([(px - 8, py), (px + 8, py)], fill=(255, 255, 255), width=2)
    draw.line([(px, py - 8), (px, py + 8)], fill=(255, 255, 255), width=2)
    text_font = _font(max(10, h // 22))
    box = draw.textbbox((6, 4), caption, font=text_font)
    draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
    draw.text((6, 4), caption, fill=(255, 255, 255), font=text_font)
    return np.asarray(image)


def contact_sheet(pictures: Sequence[np.ndarray], columns: int = SHEET_COLUMNS, gap: int = 4) -> np.ndarray:
    """Pictures of one size in a grid, row by row, on black: list of (H, W, 3) -> (rows*(H+gap)-gap, ..., 3)."""
    h, w = pictures[0].shape[:2]
    columns = min(columns, len(pictures))
    rows = -(-len(pictures) // columns)
    sheet = np.zeros((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), np.uint8)
    for i, picture in enumerate(pictures):
        r, c = divmod(i, columns)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = picture
    return sheet


def sheet_indices(count: int, wanted: int) -> list[int]:
    """Up to ``wanted`` evenly spaced indices of ``count`` frames, first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, min(wanted, count))})


def write_png(picture: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(picture).save(path, format="PNG")
    return path


def curve_svg(times: Sequence[float], series: dict[str, Sequence[float]], title: str, width: int = 640,
              height: int = 200) -> str:
    """A line plot as standalone SVG text: one polyline per series over ``times`` (s), y from the data's range."""
    left, right, top, bottom = 48, 12, 24, 28
    values = np.concatenate([np.asarray(v, float) for v in series.values()])
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    t_end = max(float(times[-1]), 1e-6) if len(times) else 1.0

    def xy(t: float, v: float) -> str:
        x = left + (width - left - right) * t / t_end
        y = top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))
        return f"{x:.1f},{y:.1f}"

    colours = ["#d62728", "#1f77b4", "#2ca02c"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="15">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{hi:.2f}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{lo:.2f}</text>',
             f'<text x="{width - right}" y="{height - 8}" text-anchor="end">{t_end:.1f} s</text>',
             f'<text x="{left}" y="{height - 8}">0 s</text>']
    for (name, ys), colour, row in zip(series.items(), colours, range(len(series))):
        points = " ".join(xy(t, v) for t, v in zip(times, ys))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{points}"/>')
        parts.append(f'<text x="{width - right - 4}" y="{top + 12 + 13 * row}" text-anchor="end" '
                     f'fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


_PAGE_SCRIPT = """
// Which media loaded: a headless browser (and a person) can read the result in #status.
window.addEventListener('load', function () {
  var items = Array.prototype.slice.call(document.querySelectorAll('img, video'));
  var waits = items.map(function (el) {
    return new Promise(function (done) {
      if (el.tagName === 'IMG') { done(el.complete && el.naturalWidth > 0); return; }
      // loadeddata: the first picture is decoded, so the browser plays this codec, not only parses the file
      if (el.readyState >= 2) { done(el.videoWidth > 0); return; }
      el.addEventListener('loadeddata', function () { done(el.videoWidth > 0); });
      el.addEventListener('error', function () { done(false); });
    });
  });
  Promise.all(waits).then(function (ok) {
    var loaded = ok.filter(Boolean).length;
    var status = document.getElementById('status');
    status.textContent = 'media loaded: ' + loaded + ' of ' + ok.length;
    status.setAttribute('data-loaded', String(loaded));
    status.setAttribute('data-total', String(ok.length));
  });
});
"""


def _url(path: str) -> str:
    """A relative file path as an HTML attribute value: URL-encoded (a ``#`` or ``%`` in a file name is part of the
    name, not a fragment or an escape), then HTML-escaped."""
    from urllib.parse import quote

    return html.escape(quote(path, safe="/"), quote=True)


def _input_section(item: dict[str, Any]) -> str:
    name = html.escape(item["name"])
    if item.get("error"):
        return f'<section class="failed"><h2>{name}</h2><p class="error">{html.escape(item["error"])}</p></section>'
    parts = [f'<section><h2>{name}</h2><p class="source">{html.escape(item["source"])}</p>']
    files = item["files"]
    if "video" in files:
        parts.append(f'<video controls preload="auto" src="{_url(files["video"])}"></video>')
    if "overlay" in files:
        parts.append(f'<img class="overlay" alt="overlay of {name}" src="{_url(files["overlay"])}">')
    if "sheet" in files:
        parts.append(f'<img class="sheet" alt="contact sheet of {name}" src="{_url(files["sheet"])}">')
    if "plot" in files:
        parts.append(f'<img class="plot" alt="map maximum over time of {name}" src="{_url(files["plot"])}">')
    links = " · ".join(f'<a href="{_url(files[k])}">{k}</a>' for k in ("csv", "json", "maps") if k in files)
    parts.append(f"<p>{html.escape(item['summary'])} — {links}</p></section>")
    return "\n".join(parts)


PAGE_DATA_ID = "sslt-localize-page"


def page_data(page_text: str) -> Any:
    """The JSON :func:`index_html` embedded in a page (``data``), or None where there is none."""
    import json
    import re

    found = re.search(rf'<script type="application/json" id="{PAGE_DATA_ID}">(.*?)</script>', page_text, re.DOTALL)
    if found is None:
        return None
    try:
        return json.loads(found.group(1))
    except ValueError:
        return None


def index_html(title: str, notes: Sequence[str], items: Sequence[dict[str, Any]], data: Any = None) -> str:
    """The page: one section per input (video, contact sheet, plot, record files), failed inputs with their reason.

    items: dicts with ``name``, ``source``, ``error`` (or None), ``files`` ({kind: path relative to the page}) and
    ``summary`` (plain text). ``data``: JSON embedded in the page for the program that writes it next
    (:func:`page_data` reads it back).
    """
    import json

    # "</" inside a script ends it: "<\/" is the same JSON string
    embedded = json.dumps(data).replace("</", "<\\/") if data is not None else ""
    data_block = f'<script type="application/json" id="{PAGE_DATA_ID}">{embedded}</script>' if embedded else ""
    sections = "\n".join(_input_section(item) for item in items)
    note_list = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; background: #f6f6f6; }}
section {{ background: white; padding: 1em; margin-bottom: 1.2em; border-radius: 6px; }}
video, img.overlay {{ max-width: 100%; display: block; margin-bottom: .6em; }}
img.sheet {{ max-width: 100%; display: block; margin-bottom: .6em; }}
.error {{ color: #b00020; }} .source {{ color: #666; font-size: 90%; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
<ul>{note_list}</ul>
<p id="status" data-loaded="" data-total="">media loading…</p>
{sections}
<script>{_PAGE_SCRIPT}</script>
{data_block}
</body></html>
"""
