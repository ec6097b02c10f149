"""The pictures of a report: the PNG heatmap (size, the colour of each kind of cell) and the
self-contained HTML page, from a real merge; the error when matplotlib is missing."""

from __future__ import annotations

import re
import sys

import pytest

from merge_core.errors import InputError
from merge_core.publish.report_plot import ABSENT, DPI, UNCHANGED, figure, html_bytes, png_bytes, relative_norm
from merge_core.publish.report_summary import summary_text
from merge_core.publish.report_view import load_view
from tests.merge_core.publish.test_report_view import (
    BOOSTED_LAYER,
    MANIFEST,
    TWO_ADAPTERS_QUANTIZED,
    Merged,
    real_merge,
    report_bytes,
)


def imread(path: str):
    return pytest.importorskip("matplotlib.image").imread(path)


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Merged:
    pytest.importorskip("matplotlib")  # an optional extra: without it only the error test applies
    return real_merge(str(tmp_path_factory.getbasetemp() / "report-view-merge"))  # shared with test_report_view


def colour_at(fig, pixels, ax, layer: int, module: int) -> tuple[float, ...]:
    """The saved PNG's colour at the centre of one cell of a panel."""
    x, y = ax.transData.transform((module, layer))
    return tuple(float(c) for c in pixels[round(fig.bbox.height - y), round(x)][:3])


def test_the_png_is_1000_px_wide_and_draws_untouched_tensors_grey_and_absent_ones_white(merged, tmp_path):
    view = merged.view()
    path = str(tmp_path / "changes.png")
    with open(path, "wb") as f:
        f.write(png_bytes(view))
    pixels = imread(path)
    assert pixels.shape[1] == 1000 and 300 <= pixels.shape[0] <= 1500

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure(view)  # the same drawing, to find where each cell landed
    FigureCanvasAgg(fig).draw()
    assert fig.bbox.width == 1000 and fig.bbox.height == pixels.shape[0]
    grid, ax = view.grids[0], fig.axes[0]
    row, k = grid.layers.index("1"), grid.modules.index("k")
    assert colour_at(fig, pixels, ax, row, k) == pytest.approx(UNCHANGED[:3], abs=2 / 255)
    assert colour_at(fig, pixels, ax, grid.layers.index("0"), grid.modules.index("embeddings")) == \
        pytest.approx(ABSENT[:3], abs=2 / 255)
    boosted, q = grid.layers.index(str(BOOSTED_LAYER)), grid.modules.index("q")
    expected = colormaps["viridis"](relative_norm(view.grids)(grid.values[boosted][q]))[:3]
    assert colour_at(fig, pixels, ax, boosted, q) == pytest.approx(expected, abs=2 / 255)
    assert colour_at(fig, pixels, ax, boosted, q) != pytest.approx(colour_at(fig, pixels, ax, row, q), abs=0.05)
    assert str(BOOSTED_LAYER) in [t.get_text() for t in ax.get_yticklabels()]
    assert "base + adapter, merged" in fig.get_suptitle()


def test_the_html_page_is_one_file_with_the_png_inside(merged, tmp_path):
    view = merged.view()
    summary = summary_text(view)
    path = tmp_path / "changes.html"
    path.write_bytes(html_bytes(view, summary))
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page and "<script" not in page
    assert summary.splitlines()[1].strip() in page
    table = page[page.index("<table>"):]
    assert table.index(f"model.layers.{BOOSTED_LAYER}.") < table.index("model.layers.0.")  # most changed first


def test_several_adapters_and_a_quantized_base_get_a_panel_each():
    pytest.importorskip("matplotlib")
    view = load_view(report_bytes(TWO_ADAPTERS_QUANTIZED, quantized=True, split=True), MANIFEST)
    fig = figure(view)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["‖ΔW‖/‖W‖ of a", "‖ΔW‖/‖W‖ of b", "adapter kept after requantization"]
    assert "Qwen3-30B-A3B-FP8 + a, b, merged 2026-11-29" == fig.get_suptitle()
    assert fig.get_size_inches()[0] * DPI == 1000


@pytest.mark.parametrize("write, flag", [(lambda v: png_bytes(v, "--png"), "--png"),
                                         (lambda v: html_bytes(v, "summary", "--html"), "--html")])
def test_without_matplotlib_a_picture_is_bad_input_that_says_how_to_install_it(monkeypatch, write, flag):
    view = load_view(report_bytes(TWO_ADAPTERS_QUANTIZED, quantized=True, split=True), MANIFEST)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(InputError) as error:
        write(view)
    assert (error.value.subject, error.value.fix) == (flag, "pip install 'lora-merge[plot]'")
    assert "matplotlib" in error.value.what
