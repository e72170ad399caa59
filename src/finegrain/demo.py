"""``finegrain demo``: the whole pipeline on the built-in world, small budgets, one report.

Stages (each with its own progress bar; each skipped when its result already exists in the demo directory, so a rerun
after an interruption continues where it stopped):

1. build the world (tokenizer, SFT base model, data sets)
2. show samples of the SFT model with their oracle scores

The demo prints a summary table and the path of its report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from finegrain.config import add_arguments, build, option


@dataclasses.dataclass
class DemoConfig:
    """The end-to-end demo on the built-in world."""

    output_dir: str = option("runs/demo", "where the demo writes its world, runs and report")
    seed: int = option(0, "seed of the world and every run")
    samples: int = option(6, "SFT samples to show with their oracle scores")
    fresh: bool = option(False, "ignore results of a previous demo in output_dir and redo every stage")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def run_demo(cfg: DemoConfig) -> dict:
    from finegrain.world import ensure_world, format_summary
    from finegrain.world.build import read_jsonl
    from finegrain.world.config import WorldConfig
    from finegrain.world.oracle import judge

    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world_dir = out / "world"
    if cfg.fresh and world_dir.exists():
        import shutil

        shutil.rmtree(world_dir)
    print("stage 1/2: the built-in world", flush=True)
    world = ensure_world(world_dir, WorldConfig(seed=cfg.seed))
    summary = json.loads((world / "world.json").read_text())
    print(format_summary(summary), flush=True)

    print("\nstage 2/2: samples of the SFT model, judged by the oracle", flush=True)
    rows = read_jsonl(world / "data" / "credit_test.jsonl")[: cfg.samples]
    table = []
    for r in rows:
        j = judge(r["prompt"], r["response"])
        table.append([r["prompt"], r["response"], f"{j.score:+.2f}", "yes" if j.well_formed else "no"])
    print(_table(table, ["prompt", "SFT response", "oracle", "well-formed"]))
    result = {"world": str(world), "seconds": round(time.time() - t0, 1), "sft": summary["sft"]}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    print(f"\ndemo finished in {result['seconds']} s; results in {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finegrain demo", description=DemoConfig.__doc__)
    add_arguments(parser, DemoConfig)
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    run_demo(build(DemoConfig, ns))
    return 0
