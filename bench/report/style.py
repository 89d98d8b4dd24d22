"""The one palette of every figure: a fixed colour per method and a fixed marker per
variant, so a series looks the same in every figure of every dataset (the trade-off, the
tokens per block, the speed figure, the training curves, the compute maps' titles).

A series is named "<method>[ <variant knobs>]" (``tables.series``: "paumer",
"paumer batching=packed"). Its colour is its method's; its marker is its variant's
(the default variant: the method's own marker). A method or variant this table does
not know (a plugin) gets a colour and marker picked by a stable hash of its name, from
the same lists, so it too looks the same everywhere.
"""
from __future__ import annotations

import zlib

# Okabe-Ito / seaborn "colorblind", fixed per method: neighbours in the figures far apart
METHOD_COLORS = {
    "baseline": "#000000",
    "baseline-ft": "#000000",
    "paumer": "#CC78BC",  # pink-purple
    "early-exit": "#D55E00",  # vermillion
    "tome": "#029E73",  # green
    "algm": "#0173B2",  # blue
    "algm-ft": "#DE8F05",  # orange
    "dtop": "#8C564B",  # brown
    "shallow": "#56B4E9",  # sky blue
    "static": "#949494",  # grey
}
# for methods not named above (plugins): picked by hash, none of them used above
EXTRA_COLORS = ("#CA9161", "#ECE133", "#17BECF", "#BCBD22", "#393B79", "#637939", "#E377C2", "#9467BD")
METHOD_MARKERS = {"baseline": "*", "baseline-ft": "D", "paumer": "D", "early-exit": "^", "tome": ">", "algm": "o", "algm-ft": "s", "dtop": "p",
                  "shallow": "X", "static": "<"}
# a variant's own marker, whatever its method (a hollow marker: it shows under a filled one)
VARIANT_MARKERS = {"batching=packed": "d", "mode=image": "v", "schedule=decreasing": "h", "unmerge=before": "P"}
EXTRA_MARKERS = ("*", "H", "8", "1", "2", "3", "4", "+", "x")
# a knob at its default named as a variant (early exit's mode=token): drawn as the method itself
DEFAULT_VARIANTS = {"mode=token", "batching=pad", "schedule=constant", "unmerge=after"}
LINE_REFERENCES = ("static", "shallow")  # fixed-cost references: drawn dashed
POINTS = {"baseline": "baseline", "baseline-ft": "baseline-ft (control)"}  # single points, own markers
FULL_DEPTH_CANDIDATES = ("#FFFFFF", "#F2F2F2", "#FFD8F0", "#000000")  # compute maps: "never left"


def _pick(name: str, choices: tuple) -> str:
    return choices[zlib.crc32(name.encode()) % len(choices)]


def method_color(method: str) -> str:
    """The colour of a method in every figure."""
    return METHOD_COLORS.get(method) or _pick(method, EXTRA_COLORS)


def split_series(name: str) -> tuple[str, str]:
    """"paumer batching=packed" -> ("paumer", "batching=packed"); no variant: ""."""
    method, _, variant = str(name).partition(" ")
    return method, variant


def _is_default(variant: str) -> bool:
    return all(part in DEFAULT_VARIANTS for part in variant.split())


def series_marker(name: str) -> str:
    method, variant = split_series(name)
    if _is_default(variant):
        return METHOD_MARKERS.get(method) or _pick(method, EXTRA_MARKERS)
    return VARIANT_MARKERS.get(variant) or _pick(variant, EXTRA_MARKERS)


def series_label(name: str) -> str:
    """A short legend label: the baseline and control named as such, a variant by its
    values ("paumer packed", "early-exit image")."""
    if name in POINTS:
        return POINTS[name]
    method, variant = split_series(name)
    values = " ".join(part.partition("=")[2] or part for part in variant.split())
    return f"{method} {values}".strip()


def series_style(name: str) -> dict:
    """matplotlib keywords of a series' line and markers: its method's colour, its
    variant's marker (hollow for a non-default variant), dashed for the fixed-cost
    references; the baseline and the control are single black points."""
    if name == "baseline":
        return {"color": "black", "marker": "*", "markersize": 9, "linestyle": "none", "zorder": 6}
    if name == "baseline-ft":
        return {"color": "black", "marker": "D", "markersize": 4.5, "markerfacecolor": "white",
                "markeredgewidth": 1.0, "linestyle": "none", "zorder": 6}
    method, variant = split_series(name)
    default = _is_default(variant)
    style = {"color": method_color(method), "marker": series_marker(name), "markersize": 3.5,
             "linestyle": "--" if method in LINE_REFERENCES else ("-" if default else (0, (4, 1.5)))}
    if not default:
        style.update(markerfacecolor="white", markeredgewidth=0.9)
    return style


def series_styles(names) -> dict[str, dict]:
    """``series_style`` of each name (kept for callers that want them all at once)."""
    return {name: series_style(name) for name in set(names)}


def full_depth_color(palette) -> str:
    """A colour for "never left the encoder" in compute maps that no class of
    ``palette`` (RGB 0-255 triples) is near: the candidate farthest from every class."""
    def rgb(hex_color: str) -> tuple:
        return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))

    def distance(c: str) -> float:
        return min((sum((a - b) ** 2 for a, b in zip(rgb(c), map(int, p[:3]))) for p in palette), default=1e9)

    return max(FULL_DEPTH_CANDIDATES, key=distance)


def context_line(records: list[dict], dataset: str) -> str:
    """What a figure shows, in one line: dataset, model (preset, decoder) and machine
    (device, threads, precision), from its records; several values are joined."""
    def values(*keys) -> str:
        found = []
        for r in records:
            v = next((r.get(k) for k in keys if r.get(k) not in (None, "")), None)
            if v is None and keys[0] in ("model", "decoder"):
                v = (r.get("eval") or {}).get(keys[0])
            if v is not None and str(v) not in found:
                found.append(str(v))
        return "/".join(found)

    from bench.results import record_precision

    precision = "/".join(sorted({str(record_precision(r)) for r in records if record_precision(r)}))
    model = values("model")
    decoder = values("decoder")
    device = values("device_name", "device")
    threads = values("threads")
    gpu = "cuda" in values("device") or "NVIDIA" in device
    parts = [dataset, f"{model} ({decoder} decoder)" if decoder else model,
             device + (f", {threads} threads" if threads and not gpu else ""), precision]
    return " · ".join(p for p in parts if p)
