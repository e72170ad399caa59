"""The self-contained HTML report over any number of run directories (``finegrain report``).

The page has no external assets: styles are inline, fonts are the system's, and plots are matplotlib PNGs
embedded as base64 ``data:`` URIs, so the file can be mailed or opened offline. Each run directory is read
as described in docs/run-directory.md; a missing or unreadable file is skipped with a note on the page.

Stable hooks for tests and styling: ``id="metrics-table"``, ``id="frontier-plot"``, ``id="training-curves"``,
``id="token-credit-table"``, ``id="heatmaps"``, ``id="notes"``; every plot is a ``<figure class="plot">``
and every heatmap a ``<div class="heatmap">``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from finegrain.errors import FinegrainError
from finegrain.eval.metrics import evaluate_token_credit
from finegrain.report.heatmap import HEATMAP_CSS, heatmap_legend, render_heatmap

__all__ = ["RunData", "RunDirError", "build_report", "load_run"]

# Training metrics plotted when present, in this order (names from CONTRIBUTING.md's vocabulary).
CURVE_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
                 "rewards/penalized", "rewards/raw", "rewards/kl", "objective/kl", "kl/chosen", "kl/rejected",
                 "accuracy")
MAX_CURVE_PANELS = 6
MAX_HEATMAP_EXAMPLES = 3


class RunDirError(FinegrainError, FileNotFoundError):
    """A path given as a run directory does not exist or is not a directory."""


@dataclass
class RunData:
    """What the report uses from one run directory; ``None`` / empty where a file is missing."""

    path: Path
    label: str
    run: dict | None = None
    config_text: str | None = None
    eval: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    token_credit: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str((self.run or {}).get("method") or (self.run or {}).get("command") or "")

    @property
    def credit_examples(self) -> list[dict]:
        """The examples of token_credit.json (entries that are not objects left out)."""
        return [e for e in (self.token_credit or {}).get("examples") or [] if isinstance(e, dict)]

    def last(self, metric: str, split: str) -> float | None:
        """The last logged value of ``metric`` in ``split`` (``"train"`` or ``"eval"``)."""
        for row in reversed(self.metrics):
            if row.get("split", "train") == split and _is_number(row.get(metric)):
                return float(row[metric])
        return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _read_text(path: Path, notes: list[str], missing: str = "; skipped", unreadable: str = "; skipped"):
    """The file's text, or None with a note (``"NAME not found" + missing``, ``"... could not be read" +
    unreadable``)."""
    if not path.is_file():
        notes.append(f"{path.name} not found{missing}")
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        notes.append(f"{path.name} could not be read ({exc}){unreadable}")
        return None


def _read_json(path: Path, notes: list[str]) -> dict | None:
    text = _read_text(path, notes)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        notes.append(f"{path.name} could not be read ({exc}); skipped")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object; skipped")
        return None
    return data


def _read_metrics(path: Path, notes: list[str]) -> list[dict]:
    text = _read_text(path, notes, missing="; no training curves")
    rows, bad = [], []
    for lineno, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and _is_number(row.get("step")):
            rows.append(row)
        else:
            bad.append(lineno)
    if bad:
        # A run killed mid-write leaves a truncated last line; that is expected and must not stop the report.
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        notes.append(f"{path.name}: skipped {len(bad)} malformed line(s) (line {shown})")
    return rows


def load_run(path: Path, label: str | None = None) -> RunData:
    """Read one run directory; missing or malformed files become notes, not errors.

    Raises:
        RunDirError: if ``path`` does not exist or is not a directory.
    """
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"run directory not found: {path} (pass the --output_dir of a finegrain run)")
    if not path.is_dir():
        raise RunDirError(f"not a run directory (it is a file): {path}")
    data = RunData(path=path, label=label or path.name)
    data.run = _read_json(path / "run.json", data.notes)
    data.config_text = _read_text(path / "config.yaml", data.notes, missing="", unreadable="")
    data.metrics = _read_metrics(path / "metrics.jsonl", data.notes)
    data.eval = _read_json(path / "eval.json", data.notes)
    data.token_credit = _read_json(path / "token_credit.json", data.notes)
    return data


def _labels(paths: list[Path]) -> list[str]:
    """Short unique labels: the directory name, or more of the path where names collide."""
    labels = [p.name or str(p) for p in paths]
    for depth in range(2, 6):
        if len(set(labels)) == len(labels):
            break
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
    if len(set(labels)) != len(labels):
        labels = [f"{lab} #{i + 1}" for i, lab in enumerate(labels)]
    return labels


# ---------------------------------------------------------------------------------------------- page pieces


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "&ndash;"
    if _is_number(x) and not (isinstance(x, float) and not math.isfinite(x)):
        return f"{x:.{digits}g}" if isinstance(x, float) else str(x)
    return html.escape(str(x))


# (header, getter) for the metrics table, a string getter being a key of eval.json; a column is dropped when
# no run has a value for it.
_METRIC_COLUMNS = (
    ("method", lambda r: r.method or None),
    ("status", lambda r: (r.run or {}).get("status")),
    ("mean reward", "mean_reward"),
    ("ref mean reward", "ref_mean_reward"),
    ("win rate", "win_rate"),
    ("tie rate", "tie_rate"),
    ("seq KL", "seq_kl"),
    ("entropy", "entropy"),
    ("distinct-1", "distinct_1"),
    ("distinct-2", "distinct_2"),
    ("length", "length"),
    ("well-formed", "well_formed_rate"),
    ("judge", "judge"),
    ("final train loss", lambda r: r.last("loss", "train")),
    ("eval loss", lambda r: r.last("loss", "eval")),
    ("pairwise acc", lambda r: next((v for split in ("eval", "train")
                                     if (v := r.last("rewards/accuracies", split)) is not None), None)),
    ("final step", lambda r: max((row["step"] for row in r.metrics), default=None)),
)


def _metrics_table(runs: list[RunData]) -> str:
    columns = [(name, (lambda r, key=get: (r.eval or {}).get(key)) if isinstance(get, str) else get)
               for name, get in _METRIC_COLUMNS]
    columns = [(name, get) for name, get in columns if any(get(r) is not None for r in runs)]
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    body = []
    for r in runs:
        cells = "".join(f"<td>{_fmt(get(r))}</td>" for _, get in columns)
        body.append(f'<tr><th scope="row">{html.escape(r.label)}</th>{cells}</tr>')
    return (
        '<table id="metrics-table" class="metrics">'
        f"<thead><tr><th>run</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        '<p class="caption">win rate: strict wins against the reference, ties apart in tie rate; seq KL: mean '
        "over responses of the summed per-token KL(policy || reference); entropy: mean per-token predictive "
        "entropy (nats); pairwise acc: last logged rewards/accuracies (eval split if logged, else train).</p>"
    )


def _plot_html(fig, plot_id: str, caption: str, alt: str) -> str:
    """The figure as a ``<figure>`` holding its PNG as a base64 ``data:`` URI. Plots use matplotlib's
    object-oriented API (``matplotlib.figure.Figure``) with the Agg canvas: no pyplot state, no GUI backend,
    safe in threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No Software/URL text chunks in the PNG: the file stays free of any external reference.
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (
        f'<figure class="plot" id="{plot_id}"><img alt="{html.escape(alt, quote=True)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
    )


def _frontier_plot(runs: list[RunData], notes: list[str]) -> str:
    from matplotlib.figure import Figure

    points = [(r, float(r.eval["seq_kl"]), float(r.eval["mean_reward"])) for r in runs
              if _is_number((r.eval or {}).get("seq_kl")) and _is_number((r.eval or {}).get("mean_reward"))]
    if not points:
        notes.append("reward-versus-KL frontier: no run has both seq_kl and mean_reward in eval.json")
        return '<p class="note">No eval.json with seq_kl and mean_reward: frontier not drawn.</p>'
    ax = (fig := Figure(figsize=(6.4, 4.4))).add_subplot()
    refs = [float(r.eval["ref_mean_reward"]) for r, _, _ in points
            if _is_number(r.eval.get("ref_mean_reward"))]
    if refs:
        ref = sum(refs) / len(refs)
        ax.scatter([0.0], [ref], marker="s", color="#555555", zorder=3)
        ax.annotate("reference", (0.0, ref), textcoords="offset points", xytext=(6, -12), fontsize=9)
    for i, (r, kl, reward) in enumerate(points):
        ax.scatter([kl], [reward], color=f"C{i % 10}", s=40, zorder=3)
        text = r.label if not r.method or r.method == r.label else f"{r.label} ({r.method})"
        ax.annotate(text, (kl, reward), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("sequential KL(policy || reference), mean per response")
    ax.set_ylabel("mean reward (judge)")
    ax.set_title("reward versus KL")
    ax.grid(True, alpha=0.3)
    return _plot_html(fig, "frontier-plot", "One point per run (from eval.json); up and to the left is "
                      "better. The square is the reference.", "reward versus KL frontier")


def _curves_plot(runs: list[RunData], notes: list[str]) -> str:
    from matplotlib.figure import Figure

    present = {k for r in runs for row in r.metrics for k, v in row.items() if _is_number(v)}
    present -= {"step", "samples", "split"}
    names = [m for m in CURVE_METRICS if m in present]
    # Other reward-like or KL metrics a trainer logs, after the known ones.
    names += sorted(m for m in present if m not in names
                    and m.split("/")[0] in {"rewards", "objective", "kl"})
    names = names[:MAX_CURVE_PANELS]
    if not names:
        notes.append("training curves: no metrics.jsonl with plottable metrics")
        return '<p class="note">No metrics.jsonl with plottable metrics: training curves not drawn.</p>'
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    for panel, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, panel + 1)
        for i, r in enumerate(runs):
            for split, style in (("train", "-"), ("eval", "--")):
                pts = [(row["step"], row[name]) for row in r.metrics
                       if row.get("split", "train") == split and _is_number(row.get(name))]
                if pts:
                    xs, ys = zip(*pts)
                    label = r.label if split == "train" else f"{r.label} (eval)"
                    ax.plot(xs, ys, style, color=f"C{i % 10}", label=label, linewidth=1.4,
                            marker="." if len(xs) < 3 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if panel == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _plot_html(fig, "training-curves", "Logged metrics versus optimizer step, one colour per run; "
                      "solid: train, dashed: eval.", "training curves")


def _credit_rows(run: RunData) -> list[tuple[str, dict]]:
    """(source, stats) per non-truth source: AUROC and precision@k over the run's examples."""
    examples, stored = run.credit_examples, (run.token_credit or {}).get("auroc")
    stored = stored if isinstance(stored, dict) else {}
    sources = [ex.get("sources") or {} for ex in examples]
    # in order of first appearance
    names = dict.fromkeys([n for srcs in sources for n in srcs if n != "truth"] + list(stored))
    rows = []
    for name in names:
        stats: dict = {"auroc": stored.get(name) if _is_number(stored.get(name)) else None}
        scored = [srcs for srcs in sources if name in srcs and "truth" in srcs]
        scores, credit = [srcs[name] for srcs in scored], [srcs["truth"] for srcs in scored]
        if scores:
            try:
                res = evaluate_token_credit(scores, credit)
            except (ValueError, FloatingPointError) as exc:
                run.notes.append(f"token_credit.json: source '{name}' not scored ({exc})")
            else:
                if stats["auroc"] is None:
                    stats["auroc"] = res.auroc
                stats.update(precision_at_k=res.precision_at_k, k=res.k, n_pos=res.n_pos, n_neg=res.n_neg)
        rows.append((name, stats))
    return rows


def _token_credit_table(runs: list[RunData]) -> str:
    keys = ("auroc", "precision_at_k", "k", "n_pos", "n_neg")
    body = [f'<tr><th scope="row">{html.escape(r.label)}</th><td>{html.escape(name)}</td>'
            + "".join(f"<td>{_fmt(st.get(key))}</td>" for key in keys) + "</tr>"
            for r in runs for name, st in _credit_rows(r)]
    if not body:
        return '<p class="note">No token_credit.json with reward sources: token-credit table empty.</p>'
    return (
        '<table id="token-credit-table" class="metrics"><thead><tr><th>run</th><th>source</th><th>AUROC</th>'
        "<th>precision@k</th><th>k</th><th>positive tokens</th><th>negative tokens</th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
        '<p class="caption">Positive tokens: ground-truth credit &gt; 0; negative: credit &lt; 0; tokens with zero '
        "credit are left out. AUROC: the stored value from token_credit.json where present, else computed from "
        "the examples; precision@k: share of the k highest-scored tokens that are positive (k = number of "
        "positive tokens), over the examples in the file.</p>"
    )


def _heatmaps(runs: list[RunData]) -> str:
    parts = []
    for r in runs:
        examples = r.credit_examples
        if not examples:
            continue
        parts.append(f'<h3 class="run-heading">{html.escape(r.label)}</h3>')
        for j, ex in enumerate(examples[:MAX_HEATMAP_EXAMPLES]):
            try:
                prompt = ex.get("prompt") if isinstance(ex.get("prompt"), str) else None
                parts.append(render_heatmap(ex.get("tokens") or [], ex.get("sources") or {}, prompt=prompt,
                                            title=f"example {j + 1}"))
            except (ValueError, TypeError) as exc:
                r.notes.append(f"token_credit.json: example {j + 1} not drawn ({exc})")
        if len(examples) > MAX_HEATMAP_EXAMPLES:
            parts.append(f'<p class="caption">{len(examples) - MAX_HEATMAP_EXAMPLES} more example(s) in '
                         f"{html.escape(str(r.path / 'token_credit.json'))}.</p>")
    if not parts:
        return '<p class="note">No token_credit.json examples: no heatmaps.</p>'
    return heatmap_legend() + "".join(parts)


_PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto; max-width: 1200px;
  padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3.run-heading { font-size: 1.05em; margin-bottom: 0.2em; }
table.metrics { border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.metrics th[scope=row], table.metrics td:first-child { text-align: left; }
table.metrics thead th { background: #f3f3f3; }
figure.plot { margin: 0.5em 0; } figure.plot img { max-width: 100%; }
figcaption, .caption { font-size: 12px; color: #555; }
.note { color: #8a5a00; font-size: 13px; }
ul#notes { font-size: 13px; color: #8a5a00; }
"""


def build_report(run_dirs: list[Path], out_path: Path, title: str = "finegrain report") -> Path:
    """Write one self-contained HTML report comparing ``run_dirs`` and return its path.

    Sections: the runs, a metrics table (eval.json plus the last logged metrics), the reward-versus-KL
    frontier, training curves, token-credit AUROC per reward source, and token-reward heatmaps of example
    responses. Missing files in a run directory are skipped with a note on the page.

    Args:
        run_dirs: run directories (see docs/run-directory.md), at least one.
        out_path: the HTML file to write; parent directories are created.
        title: page title.

    Returns:
        ``out_path``.

    Raises:
        RunDirError: if a run directory does not exist (checked before anything is written).
        ValueError: if ``run_dirs`` is empty.
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("build_report needs at least one run directory")
    runs = [load_run(p, label) for p, label in zip(paths, _labels(paths))]
    page_notes: list[str] = []

    run_items = "".join(
        f"<li><strong>{html.escape(r.label)}</strong>: {html.escape(str(r.path))}"
        f"{' &mdash; ' + html.escape(r.method) if r.method else ''}"
        f"{' (' + html.escape(str(r.run.get('status'))) + ')' if r.run and r.run.get('status') else ''}"
        + (f'<details class="config"><summary>config.yaml</summary><pre>{html.escape(r.config_text)}</pre>'
           "</details>" if r.config_text else "")
        + "</li>"
        for r in runs
    )
    sections = [
        f'<section id="runs"><h2>Runs</h2><ul>{run_items}</ul></section>',
        f'<section id="metrics"><h2>Metrics</h2>{_metrics_table(runs)}</section>',
        f'<section id="frontier"><h2>Reward versus KL</h2>{_frontier_plot(runs, page_notes)}</section>',
        f'<section id="curves"><h2>Training curves</h2>{_curves_plot(runs, page_notes)}</section>',
        f'<section id="token-credit"><h2>Token credit</h2>{_token_credit_table(runs)}</section>',
        f'<section id="heatmaps"><h2>Token-reward heatmaps</h2>{_heatmaps(runs)}</section>',
    ]
    # Notes are gathered while the sections are built, so they are rendered last and placed after the runs.
    notes = [f"{r.label}: {n}" for r in runs for n in r.notes] + page_notes
    notes_html = "".join(f'<li class="note">{html.escape(n)}</li>' for n in notes)
    sections.insert(1, f'<section id="notes-section"><h2>Notes</h2><ul id="notes">{notes_html}</ul></section>'
                    if notes else "")
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_PAGE_CSS}{HEATMAP_CSS}</style></head>"
        f'<body><h1 id="report-title">{html.escape(title)}</h1>'
        f'<p class="caption">Generated {html.escape(generated)} by finegrain report from {len(runs)} run '
        f"director{'y' if len(runs) == 1 else 'ies'}.</p>" + "".join(sections) + "</body></html>\n"
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path
