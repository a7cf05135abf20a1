"""The one look of every paper figure: DSM vs DSM+FPE colours, colour maps, sizes and fonts.

Every figure module takes its colours from here, so "DSM" is the same blue and "DSM+FPE" the same
vermillion in all of them (Okabe–Ito colours: distinguishable with the common colour-vision
deficiencies and in greyscale by lightness). Fields use perceptually uniform maps (viridis for
densities, cividis for errors); signed fields (curl) use a diverging map centred on zero.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import matplotlib
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

__all__ = [
    "Variant",
    "COLUMN_WIDTH",
    "FULL_WIDTH",
    "DENSITY_CMAP",
    "ERROR_CMAP",
    "SIGNED_CMAP",
    "FLOOR_COLOR",
    "TRUTH_COLOR",
    "lam_color",
    "lam_label",
    "paper_style",
    "new_figure",
]

# Widths of a two-column paper (NeurIPS/ICML: one column ≈ 3.25 in, full text width ≈ 6.75 in).
COLUMN_WIDTH = 3.3
FULL_WIDTH = 6.9

DENSITY_CMAP = "viridis"
ERROR_CMAP = "cividis"
SIGNED_CMAP = "RdBu_r"  # diverging, symmetric limits: white is zero curl
FLOOR_COLOR = "0.45"  # reference lines (noise floors, fitted slopes)
TRUTH_COLOR = "black"


class Variant(enum.Enum):
    """The two training objectives compared in every figure."""

    DSM = "DSM"
    DSM_FPE = "DSM+FPE"

    @property
    def color(self) -> str:
        match self:
            case Variant.DSM:
                return "#0072B2"  # Okabe–Ito blue
            case Variant.DSM_FPE:
                return "#D55E00"  # Okabe–Ito vermillion
        raise AssertionError(self)


def lam_color(lam: float, lams: list[float]) -> tuple[float, float, float]:
    """Colour for regularizer weight ``lam`` among the positive weights ``lams``: DSM's blue for
    λ = 0; for λ > 0 the DSM+FPE vermillion, lighter for smaller λ (the largest λ is the pure hue)."""
    if lam == 0:
        return to_rgb(Variant.DSM.color)
    pos = sorted({v for v in lams if v > 0})
    base = to_rgb(Variant.DSM_FPE.color)
    if lam not in pos:
        raise ValueError(f"lam must be 0 or one of the weights {pos}; got {lam!r}")
    # mix with white: up to 55% white for the smallest of several λ, so every shade stays visible
    k = pos.index(lam)
    white = 0.55 * (len(pos) - 1 - k) / max(len(pos) - 1, 1)
    r, g, b = (c + (1 - c) * white for c in base)
    return r, g, b


def lam_label(lam: float) -> str:
    """Legend label: "DSM" for λ = 0, "DSM+FPE λ=0.1" otherwise."""
    return Variant.DSM.value if lam == 0 else f"{Variant.DSM_FPE.value} λ={lam:g}"


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Matplotlib settings for print: 8 pt text, thin lines, tight layout, 200 dpi PNGs."""
    with matplotlib.rc_context({
        "font.size": 8,
        "axes.titlesize": 8,
        "axes.labelsize": 8,
        "legend.fontsize": 7,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "lines.linewidth": 1.3,
        "lines.markersize": 4,
        "axes.linewidth": 0.6,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "legend.frameon": False,
        "savefig.dpi": 200,
        "savefig.bbox": "tight",
        "savefig.pad_inches": 0.03,
        "figure.constrained_layout.use": True,
        "pdf.fonttype": 42,  # embed TrueType: text stays text in the PDF
        "image.cmap": DENSITY_CMAP,
    }):
        yield


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure that is a file, not a window: a plain :class:`~matplotlib.figure.Figure` (no pyplot, no
    global backend), with constrained layout. Create it inside :func:`paper_style`."""
    return Figure(figsize=figsize, layout="constrained")
