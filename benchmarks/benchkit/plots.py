"""The book's figure style, and the pieces that ``plot_results.py`` makes its chapter plots and fragments of.

A figure is about 8 inches wide at 120 dpi, in colours anyone can tell apart, on opaque white; its last
line says where, when and under which load the numbers were measured. A fragment (``results/NAME.book.md``,
which a chapter page includes) is a line on the same, a short table, and the plot.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed, or wanted, on a server
import matplotlib.pyplot as plt

from benchkit.record import REPO_ROOT, markdown_table

ASSETS = REPO_ROOT / "docs" / "assets" / "benchmarks"
FROM_PAGE = "../assets/benchmarks"  # ASSETS as a chapter page (docs/chapters/NN.md) links to it

# About 8 inches at 120 dpi: 960 px, shown at the book's column width (~800 px) with 10 pt text still
# about 14 px high.
FIGSIZE, DPI = (8, 3.8), 120
# Okabe-Ito colours: distinguishable with any colour vision, and dark enough to read on white.
BLUE, ORANGE, GREEN, VERMILLION, PURPLE, SKY = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9"
CAPTION_GREY = "#444444"

plt.rcParams.update({
    "font.size": 10.5,
    "axes.titlesize": 11.5,
    "axes.labelsize": 10.5,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    # Opaque white, not transparent: the book's dark theme would put dark text on a dark page.
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
})


def panels(count: int = 1, **options):
    """A figure of ``count`` panels side by side, in the book's size: (figure, axes)."""
    return plt.subplots(1, count, figsize=FIGSIZE, layout="constrained", **options)


def bar_panel(ax, labels: list[str], values: list[float], colors: list[str], title: str, ylabel: str, decimals: int):
    """One panel of bars, each labelled with its value as the table prints it."""
    bars = ax.bar(range(len(values)), values, width=0.62, color=colors)
    ax.bar_label(bars, labels=[f"{v:.{decimals}f}" for v in values], padding=2, fontsize=10)
    ax.set_xticks(range(len(values)), labels)
    ax.tick_params(axis="x", length=0)
    ax.set_ylim(0, max(values) * 1.2)  # room for the value labels above the tallest bar
    ax.set_title(title)
    ax.set_ylabel(ylabel)


def grouped_panel(ax, groups: list[str], series: list[tuple[str, list[float]]], colors: list[str], title: str,
                  ylabel: str, decimals: int, suffix: str = ""):
    """Bars side by side in each group, one per series (label, values per group), labelled with their values."""
    width = 0.8 / len(series)
    for k, ((_, values), color) in enumerate(zip(series, colors)):
        x = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(x, values, width, color=color)
        ax.bar_label(bars, labels=[f"{v:.{decimals}f}{suffix}" for v in values], padding=2, fontsize=9.5)
    ax.set_xticks(range(len(groups)), groups)
    ax.tick_params(axis="x", length=0)
    ax.set_ylim(0, max(v for _, values in series for v in values) * 1.22 or 1)
    ax.set_title(title)
    ax.set_ylabel(ylabel)


def verdict_words(met: bool) -> str:
    return "target met" if met else "target not met"


def caption(result: dict) -> str:
    """The figure's last line: where and when it was measured, and how busy the machine was."""
    before, after = result["load_before"][0], result["load_after"][0]
    return (
        f"{result['machine']}, {result['cores']} cores · {result['date'][:10]} · "
        f"load average (1 min) {before:.2f} before, {after:.2f} after"
    )


def heading(fig, title: str, handles: list | None = None, ncols: int | None = None):
    """The figure's title, with the colour legend under it if there is one (in one row, unless ``ncols``)."""
    if handles is None:
        fig.suptitle(title, fontweight="bold", fontsize=12)
    else:
        # The legend's own title is the figure's: constrained layout makes room for an outside legend, but
        # lays a suptitle over it.
        fig.legend(
            handles=handles, loc="outside upper center", ncols=ncols or len(handles), frameon=False, title=title,
            title_fontproperties={"weight": "bold", "size": 12},
        )


def footer(fig, result: dict, detail: str = "") -> None:
    """The figure's last lines: ``caption``, then what was measured (``detail``)."""
    fig.supxlabel(caption(result) + (f"\n{detail}" if detail else ""), fontsize=10, color=CAPTION_GREY)


def save(fig, png: str) -> Path:
    ASSETS.mkdir(parents=True, exist_ok=True)
    path = ASSETS / png
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: reruns differ only in numbers
    plt.close(fig)
    return path


def fragment(lead: str, header: list[str], rows: list[list], align: str, png: str, alt: str) -> str:
    return "\n".join([lead, "", *markdown_table(header, rows, align), "", f"![{alt}]({FROM_PAGE}/{png})", ""])


def measured(result: dict) -> str:
    """The fragment's opening words: when, on what, how loaded."""
    before, after = result["load_before"][0], result["load_after"][0]
    return (
        f"Measured {result['date'][:10]} on {result['machine']} ({result['cores']} cores), "
        f"load average (1 min) {before:.2f} before the run and {after:.2f} after"
    )
