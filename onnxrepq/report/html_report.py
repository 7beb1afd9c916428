"""report.html: one self-contained page (inline CSS and SVG, no scripts, no links) that shows at a
glance which layers hurt: the per-layer SQNR chart, the ranges of the worst layers, recipe and timings."""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import QuantConfig, config_from_dict, recipe_toml

WORST = 5
_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
tr.worst td { background: #fde2e1; } tr.float td { color: #777; }
pre { background: #f6f6f6; padding: 0.8em; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; } .charts figure { margin: 0; }
figcaption { font-size: 12px; color: #555; }
"""


def write_html(report: dict[str, Any], path: Path) -> None:
    path.write_text(render_html(report), encoding="utf-8")


def render_html(report: dict[str, Any]) -> str:
    layers = report["layers"]
    worst = worst_layers(layers)
    model = report["model"]
    sections = [
        f"<h1>onnxrepq {escape(report['version'])} quantization report</h1>",
        _table(["output", "SQNR dB", "cosine", "top-1 agreement"],
               [[o["name"], _number(o["sqnr_db"]), _number(o["cosine"], 6), _number(o["top1_agreement"], 4)]
                for o in model["outputs"]]),
        f"<p>{model['quantized_layers']} layers int8, {model['float_layers']} kept float;"
        f" {100 * model['int8_weight_fraction']:.1f}% of Conv/Gemm/MatMul weights in int8;"
        f" errors measured on {model['samples']} calibration samples"
        f" (calibration: {report['calibration']['samples']} samples, sha256 {report['calibration']['sha256']}).</p>",
        "<h2>Output SQNR of each layer, in graph order</h2>",
        "<p>Red: the worst quantized layers. Grey: layers kept float. An SQNR that drops and stays low"
        " points at the layer that loses the information.</p>",
        _sqnr_chart(layers, worst),
        "<h2>Ranges of the worst layers</h2>", _worst_charts(layers, worst),
        "<h2>Layers</h2>", _layer_table(layers, worst),
    ]
    if report.get("blocks"):
        sections += ["<h2>Block reconstruction</h2>", _table(
            ["block", "layers", "loss before", "loss after"],
            [[b["name"], b["layers"], _number(b["nearest_loss"], 4), _number(b["learned_loss"], 4)]
             for b in report["blocks"]])]
    recipe = recipe_toml(config_from_dict(report["recipe"], QuantConfig))
    sections += ["<h2>Timings</h2>", _table(["step", "seconds"], [[k, _number(v)] for k, v in report["timings"].items()]),
                 "<h2>Recipe</h2>", f"<pre>{escape(recipe)}</pre>",
                 "<h2>Passes</h2>", _table(["pass", "notes"], [[p["name"], "; ".join(p["notes"])] for p in report["passes"]])]
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>onnxrepq report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")


def worst_layers(layers: Sequence[dict], count: int = WORST) -> list[str]:
    """Names of the quantized layers with the lowest output SQNR."""
    scored = [row for row in layers if "weight_bits" in row and row.get("sqnr_db") is not None]
    return [row["name"] for row in sorted(scored, key=lambda row: row["sqnr_db"])[:count]]


def _sqnr_chart(layers: Sequence[dict], worst: list[str]) -> str:
    rows = [row for row in layers if row.get("sqnr_db") is not None]
    colors = ["#d62728" if row["name"] in worst else "#999" if "float" in row else "#1f77b4" for row in rows]
    return svg_bars([row["sqnr_db"] for row in rows], colors,
                    [f"{row['name']} ({row['op']}): {row['sqnr_db']:.1f} dB" for row in rows],
                    width=1100, height=260, unit="dB", labels=[str(i) for i in range(1, len(rows) + 1)])


def _worst_charts(layers: Sequence[dict], worst: list[str]) -> str:
    rows = {row["name"]: row for row in layers}
    figures = []
    for name in worst:
        row = rows[name]
        channels = row["channel_absmax"]
        figures.append(_figure(svg_bars(channels, ["#1f77b4"] * len(channels),
                                        [f"channel {i}: {v:.4g}" for i, v in enumerate(channels)], unit="max|w|"),
                               f"{name}: max |w| per output channel (spread {_spread(channels)})"))
        histogram = row.get("input_histogram")
        if histogram and histogram["counts"]:
            counts = np.log10(np.asarray(histogram["counts"], np.float64) + 1.0)
            lo, hi = row["input_range"]
            figures.append(_figure(svg_bars(list(counts), ["#2ca02c"] * len(counts),
                                            [f"{c:.4g}: {n} values" for c, n in
                                             zip(histogram["centers"], histogram["counts"])], unit="log10 n"),
                                   f"{name}: input {row['input_tensor']} histogram,"
                                   f" observed [{row['input_observed'][0]:.3g}, {row['input_observed'][1]:.3g}],"
                                   f" quantized to [{lo:.3g}, {hi:.3g}]"))
    return f"<div class='charts'>{''.join(figures)}</div>" if figures else "<p>No quantized layers.</p>"


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption, quote=False)}</figcaption></figure>"


def svg_bars(values: Sequence[float], colors: Sequence[str], tooltips: Sequence[str], width: int = 420,
             height: int = 160, unit: str = "", labels: Sequence[str] = ()) -> str:
    """A bar chart as inline SVG (no xmlns needed inside HTML); hovering a bar shows its tooltip.

    ``labels`` go under the bars (the layer numbers of the table), for a printed page or a
    screenshot, where tooltips do not exist."""
    if not values:
        return "<svg width='0' height='0'></svg>"
    top, bottom = max(max(values), 0.0), min(min(values), 0.0)
    span = (top - bottom) or 1.0
    label_room = 16 if labels else 0
    left, plot_height = 48, height - 20 - label_room
    step = (width - left) / len(values)
    zero = 10 + plot_height * top / span
    bars = []
    for index, (value, color, tip) in enumerate(zip(values, colors, tooltips)):
        y, bar = (zero - plot_height * value / span, plot_height * value / span) if value >= 0 else (zero, -plot_height * value / span)
        bars.append(f"<rect x='{left + index * step:.1f}' y='{y:.1f}' width='{max(step * 0.85, 0.5):.1f}'"
                    f" height='{max(bar, 0.5):.1f}' fill='{color}'><title>{escape(tip)}</title></rect>")
        if index < len(labels) and step >= 9:
            bars.append(f"<text x='{left + (index + 0.42) * step:.1f}' y='{height - 4}' font-size='9'"
                        f" text-anchor='middle'>{escape(labels[index])}</text>")
    axis = (f"<line x1='{left}' y1='{zero:.1f}' x2='{width}' y2='{zero:.1f}' stroke='#444'/>"
            f"<text x='2' y='14' font-size='11'>{top:.3g}</text>"
            f"<text x='2' y='{height - 6 - label_room}' font-size='11'>{bottom:.3g}</text>"
            f"<text x='2' y='{height / 2:.0f}' font-size='11'>{escape(unit)}</text>")
    return f"<svg width='{width}' height='{height}' role='img'>{axis}{''.join(bars)}</svg>"


def _layer_table(layers: Sequence[dict], worst: list[str]) -> str:
    header = ["#", "layer", "op", "bits", "weight scales", "weight min/max", "channel max|w| spread",
              "input range", "input scale", "input ranges by", "input outliers", "SQNR dB"]
    rows, classes = [], []
    charted = [row["name"] for row in layers if row.get("sqnr_db") is not None]  # the chart's numbering
    for row in layers:
        number = charted.index(row["name"]) + 1 if row["name"] in charted else ""
        if "float" in row:
            rows.append([number, row["name"], row["op"], "float", row["float"], "", "", "", "", "", "",
                         _number(row.get("sqnr_db"))])
            classes.append("float")
            continue
        input_range = row.get("input_range")
        rows.append([number, row["name"], row["op"], row["weight_bits"], row["weight_scale_search"],
                     f"{row['weight_min']:.3g} / {row['weight_max']:.3g}", _spread(row["channel_absmax"]),
                     f"{input_range[0]:.3g} .. {input_range[1]:.3g}" if input_range else "",
                     _number(row.get("input_scale"), 5), row.get("input_scale_search", ""), _outliers(row),
                     _number(row.get("sqnr_db"))])
        classes.append("worst" if row["name"] in worst else "")
    return _table(header, rows, classes)


def _outliers(row: dict) -> str:
    """Channels and calibration samples of the input far above the median one (see calibrate/channel_stats.py)."""
    if "outlier_channel_count" not in row:
        return ""
    channels, samples = row["outlier_channels"], row["outlier_samples"]
    more = lambda shown, count: ", ..." if count > len(shown) else ""
    return (f"{row['outlier_channel_count']} ch [{', '.join(map(str, channels))}{more(channels, row['outlier_channel_count'])}]"
            f" {row['channel_range_ratio']:.1f}x; {row['outlier_sample_count']} samples"
            f" [{', '.join(map(str, samples))}{more(samples, row['outlier_sample_count'])}] {row['sample_range_ratio']:.1f}x"
            + ("; range [{:.4g}, {:.4g}] -> [{:.4g}, {:.4g}]".format(*sum(row["input_outlier_range"], []))
               if "input_outlier_range" in row else ""))


def _spread(channel_absmax: Sequence[float]) -> str:
    """Largest over median per-channel max |w|: how far one channel stretches the layer's ranges."""
    median = float(np.median(channel_absmax)) if len(channel_absmax) else 0.0
    return f"{max(channel_absmax) / median:.1f}x" if median > 0 else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        f"<tr class='{cls}'>" + "".join(f"<td>{escape(str(cell), quote=False)}</td>" for cell in row) + "</tr>"
        for row, cls in zip(rows, list(classes) + [""] * (len(rows) - len(classes))))
    return f"<table><tr>{head}</tr>{body}</table>"


def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
