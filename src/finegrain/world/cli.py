"""``finegrain world build DIR`` and ``finegrain world show [DIR]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finegrain.config import add_arguments, build, dispatch


def _build(argv: list[str]) -> int:
    from finegrain.world import format_summary
    from finegrain.world.build import build_world
    from finegrain.world.config import WorldConfig

    parser = argparse.ArgumentParser(prog="finegrain world build", description=(
        "Build the built-in world into DIR: tokenizer, SFT base model (safetensors), SFT corpus, preference pairs "
        "(train/test), revision triples, token-credit ground truth and prompt sets."))
    parser.add_argument("dir", help="output directory")
    add_arguments(parser, WorldConfig)
    ns = vars(parser.parse_args(argv))
    out = Path(ns.pop("dir"))
    cfg = build(WorldConfig, ns)
    summary = build_world(out, cfg)
    print(format_summary(summary))
    print(f"world written to {out}")
    return 0


def _show(argv: list[str]) -> int:
    from finegrain.data.files import read_jsonl
    from finegrain.world import default_world_dir, ensure_world

    parser = argparse.ArgumentParser(prog="finegrain world show", description="Print example pairs with the oracle's word credit.")
    parser.add_argument("dir", nargs="?", default=None, help=f"world directory (default {default_world_dir()})")
    parser.add_argument("--n", type=int, default=3, help="examples to show")
    ns = parser.parse_args(argv)
    world = ensure_world(ns.dir)
    print(json.dumps(json.loads((world / "world.json").read_text())["sft"], indent=2))
    for row in read_jsonl(world / "data" / "credit_test.jsonl")[: ns.n]:
        print(f"\nprompt: {row['prompt']}   score {row['score']:+.2f}")
        print("  " + " ".join(f"{w}[{c:+.1f}]" if c else w for w, c in zip(row["words"], row["credit"])))
    return 0


def main(argv: list[str] | None = None) -> int:
    return dispatch("finegrain world", argv, {"build": _build, "show": _show},
                    "usage: finegrain world {build DIR, show [DIR]} [options]\n\n"
                    "  build DIR   build the built-in world into DIR (about a minute on 2 cores)\n"
                    "  show [DIR]  print example responses with the oracle's word credit")
