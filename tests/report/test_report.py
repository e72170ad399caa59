import json
import re
from pathlib import Path

import pytest

from finegrain.cli.main import main as finegrain_main
from finegrain.report import RunDirError, build_report
from finegrain.report.cli import main


def make_run_dir(root: Path, name: str, method: str, kl: float, reward: float, steps: int = 5) -> Path:
    """A run directory with every file of docs/run-directory.md, including tokens that need escaping."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"method: {method}\nbeta: 0.1\n")
    (run / "run.json").write_text(
        json.dumps(
            {"command": "po", "method": method, "status": "completed", "started": "2026-01-01T00:00:00"}
        )
    )
    rows = []
    for step in range(1, steps + 1):
        rows.append(
            {
                "step": step,
                "samples": 8 * step,
                "split": "train",
                # Curves that differ between runs (through kl), so that plots show one line per run.
                "loss": 0.7 * 0.9 ** (step * kl),
                "rewards/margins": kl * (1 - 0.9**step),
                "rewards/accuracies": 0.5 + 0.4 * (1 - 0.8 ** (step * kl)),
            }
        )
    rows.append(
        {"step": steps, "samples": 8 * steps, "split": "eval", "loss": 0.5, "rewards/accuracies": 0.8}
    )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval.json").write_text(
        json.dumps(
            {
                "policy": f"{name}/final",
                "reference": "world/sft",
                "judge": "oracle",
                "num_prompts": 16,
                "win_rate": 0.61,
                "tie_rate": 0.05,
                "mean_reward": reward,
                "ref_mean_reward": 1.2,
                "seq_kl": kl,
                "entropy": 0.8,
                "distinct_1": 0.2,
                "distinct_2": 0.4,
                "length": 17.5,
                "well_formed_rate": 0.97,
            }
        )
    )
    examples = [
        {
            "prompt": "describe the <river> & 'sea' .",
            "tokens": ["it", "flows", "<script>", "&", '"', "."],
            "sources": {
                "truth": [0.0, 1.0, -1.0, 0.5, -0.5, 0.0],
                "token_rm": [0.1, 0.8, -0.3, 0.2, 0.4, -0.1],
            },
        },
        {
            "prompt": "p2",
            "tokens": ["a", " ", "b"],
            "sources": {
                "truth": [1.0, 0.0, -1.0],
                "token_rm": [0.5, 0.0, -0.5],
                "sentence_rm": [0.2, 0.2, 0.2],
            },
        },
    ]
    (run / "token_credit.json").write_text(json.dumps({"examples": examples}))
    return run


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = [make_run_dir(root, "dpo", "dpo", 3.4, 1.9), make_run_dir(root, "tdpo2", "tdpo2", 2.1, 1.8)]
    out = build_report(runs, root / "out" / "report.html", title="cmp <dpo> & tdpo2")
    return out.read_text(encoding="utf-8")


def test_report_has_every_section(full_report):
    page = full_report
    for hook in (
        'id="metrics-table"',
        'id="frontier-plot"',
        'id="training-curves"',
        'id="token-credit-table"',
        'id="heatmaps"',
    ):
        assert hook in page, hook
    assert page.count('class="plot"') == 2
    assert page.count('<div class="heatmap">') == 4  # 2 examples x 2 runs
    assert "<title>cmp &lt;dpo&gt; &amp; tdpo2</title>" in page
    table = re.search(r'<table id="metrics-table".*?</table>', page, re.S).group(0)
    for header in (
        "mean reward",
        "win rate",
        "seq KL",
        "entropy",
        "distinct-2",
        "well-formed",
        "final train loss",
        "pairwise acc",
    ):
        assert f"<th>{header}</th>" in table
    assert table.count("<tr>") == 3  # header + 2 runs
    assert f"<td>{0.7 * 0.9 ** (5 * 3.4):.3g}</td>" in table  # final train loss of run "dpo"
    assert "<td>0.8</td>" in table  # pairwise accuracy from the eval split
    assert 'id="notes"' not in page  # nothing missing


def test_token_credit_table_is_computed_from_examples(full_report):
    """token_rm over both examples: non-neutral truth tokens are
    +: flows 0.8, & 0.2, a 0.5;  -: <script> -0.3, " 0.4, b -0.5.
    Pairs won: 0.8 and 0.5 beat all 3; 0.2 beats -0.3, -0.5 -> 8/9 = 0.889.
    Top-3 scores 0.8(+), 0.5(+), 0.4(-) -> precision@3 = 2/3 = 0.667.
    """
    table = re.search(r'<table id="token-credit-table".*?</table>', full_report, re.S).group(0)
    row = re.search(r"<td>token_rm</td>(.*?)</tr>", table).group(1)
    assert re.findall(r"<td>([^<]*)</td>", row) == ["0.889", "0.667", "3", "3", "3"]
    assert "<td>sentence_rm</td>" in table


def test_report_is_self_contained_and_escaped(full_report):
    page = full_report
    assert not re.search(r"https?://", page)
    assert "<script" not in page.lower().replace("&lt;script", "")
    assert "<link" not in page
    for src in re.findall(r'src="([^"]*)"', page):
        assert src.startswith("data:image/png;base64,")
    assert "&lt;script&gt;" in page and "describe the &lt;river&gt; &amp; &#x27;sea&#x27; ." in page


def test_missing_and_malformed_files_become_notes(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "run.json").write_text('{"method": "ppo", "status": "interrupted"}')
    (partial / "metrics.jsonl").write_text(
        '{"step": 1, "split": "train", "rewards/penalized": 0.3}\n{"step": 2, "spl'
    )
    (partial / "eval.json").write_text("{not json")
    (partial / "token_credit.json").write_text(
        json.dumps({"examples": [{"tokens": ["a"], "sources": {"truth": [1, 2]}}]})
    )
    page = build_report([bare, partial], tmp_path / "r.html").read_text()
    notes = re.search(r'<ul id="notes">.*?</ul>', page, re.S).group(0)
    assert "bare: eval.json not found" in notes
    assert "bare: metrics.jsonl not found" in notes
    assert "partial: metrics.jsonl: skipped 1 malformed line(s) (line 2)" in notes
    assert "partial: eval.json could not be read" in notes
    assert "partial: token_credit.json: example 1 not drawn" in notes
    assert 'id="training-curves"' in page  # the one good metrics line is still plotted
    assert 'id="frontier-plot"' not in page and 'id="metrics-table"' in page


def test_nonexistent_run_dir_raises_clear_error(tmp_path):
    out = tmp_path / "r.html"
    with pytest.raises(RunDirError, match="run directory not found: .*nope"):
        build_report([tmp_path / "nope"], out)
    assert not out.exists()
    with pytest.raises(FileNotFoundError):
        build_report([tmp_path / "nope"], out)


def test_cli_writes_report_and_prints_its_path(tmp_path, capsys):
    a = make_run_dir(tmp_path / "x", "final", "dpo", 1.0, 1.0, steps=2)
    b = make_run_dir(tmp_path / "y", "final", "simpo", 2.0, 1.5, steps=2)
    out = tmp_path / "rep.html"
    assert main([str(a), str(b), "--output", str(out), "--title", "two runs"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert "<title>two runs</title>" in page
    assert "x/final" in page and "y/final" in page  # equal directory names get distinguishing labels
    assert finegrain_main(["report", str(tmp_path / "missing")]) == 1  # the dispatcher prints a user's error
    assert "run directory not found" in capsys.readouterr().err
