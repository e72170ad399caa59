"""The HTML report: token-reward heatmaps and the self-contained page over run directories.

Names are imported on first use so that ``finegrain report --help`` (``finegrain.report.cli``) does not
import torch and matplotlib.
"""

from __future__ import annotations

from finegrain.lazy import lazy_attributes

__all__ = ["RunDirError", "build_report", "render_heatmap", "token_color"]

_WHERE = {
    "RunDirError": "finegrain.report.html",
    "build_report": "finegrain.report.html",
    "render_heatmap": "finegrain.report.heatmap",
    "token_color": "finegrain.report.heatmap",
}


__getattr__ = lazy_attributes(__name__, _WHERE)


def __dir__() -> list[str]:
    return sorted(__all__)
