"""A small line/scatter plot drawn with PIL (matplotlib is not a dependency of this project).

    plot_panels("out.png", [Panel("title", "x label", "y label", {"series": [(x, y), ...]})])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    series: dict[str, list[tuple[float, float]]]
    log_x: bool = True
    hlines: dict[str, float] = field(default_factory=dict)  # label -> y of a dashed reference line


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = max(high - low, 1e-9)
    step = 10 ** math.floor(math.log10(span / count))
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= count:
            step *= mult
            break
    start = math.ceil(low / step) * step
    return [start + i * step for i in range(int((high - start) / step + 1e-9) + 1)]


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: Panel, font) -> None:
    left, top, right, bottom = box
    plot = (left + 60, top + 30, right - 150, bottom - 45)
    points = [p for s in panel.series.values() for p in s] + [(None, y) for y in panel.hlines.values()]
    xs = [p[0] for p in points if p[0] is not None]
    ys = [p[1] for p in points]
    y_low, y_high = min(ys), max(ys)
    pad = (y_high - y_low) * 0.08 or 0.5
    y_low, y_high = y_low - pad, y_high + pad
    fx = (lambda v: math.log2(v)) if panel.log_x else (lambda v: v)
    x_low, x_high = fx(min(xs)) - 0.3, fx(max(xs)) + 0.3

    def to_px(x, y):
        px = plot[0] + (fx(x) - x_low) / (x_high - x_low) * (plot[2] - plot[0])
        py = plot[3] - (y - y_low) / (y_high - y_low) * (plot[3] - plot[1])
        return px, py

    draw.rectangle(plot, outline=(0, 0, 0))
    draw.text((left + 60, top + 8), panel.title, fill=(0, 0, 0), font=font)
    for y in nice_ticks(y_low, y_high):
        _, py = to_px(min(xs), y)
        draw.line((plot[0] - 4, py, plot[0], py), fill=(0, 0, 0))
        draw.line((plot[0], py, plot[2], py), fill=(230, 230, 230))
        draw.text((left + 5, py - 6), f"{y:g}", fill=(0, 0, 0), font=font)
    x_ticks = sorted({2 ** k for k in range(0, 8)} if panel.log_x else set(nice_ticks(min(xs), max(xs))))
    for x in x_ticks:
        if x_low <= fx(x) <= x_high:
            px, _ = to_px(x, y_low)
            draw.line((px, plot[3], px, plot[3] + 4), fill=(0, 0, 0))
            draw.text((px - 6, plot[3] + 6), f"{x:g}", fill=(0, 0, 0), font=font)
    draw.text(((plot[0] + plot[2]) // 2 - 60, plot[3] + 24), panel.x_label, fill=(0, 0, 0), font=font)
    draw.text((left + 5, top + 18), panel.y_label, fill=(80, 80, 80), font=font)
    for i, (label, y) in enumerate(panel.hlines.items()):
        _, py = to_px(min(xs), y)
        for x0 in range(plot[0], plot[2], 10):
            draw.line((x0, py, min(x0 + 5, plot[2]), py), fill=(90, 90, 90))
        draw.text((plot[2] + 8, plot[3] - 14 * (i + 1)), f"-- {label}", fill=(90, 90, 90), font=font)
    for i, (label, series) in enumerate(panel.series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in sorted(series)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.text((plot[2] + 8, plot[1] + 14 * i), label, fill=colour, font=font)


def plot_panels(path: str, panels: list[Panel], width: int = 760, panel_height: int = 330) -> None:
    image = Image.new("RGB", (width, panel_height * len(panels)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i, panel in enumerate(panels):
        draw_panel(draw, (0, i * panel_height, width, (i + 1) * panel_height), panel, font)
    image.save(path)
