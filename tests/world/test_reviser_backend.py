"""The world's rule reviser as the backend ``world`` of ``finegrain label revise``: registered by the world's app,
filled in by the command line when no data set and no model are given, with the world's rules and
``revision_max_edits``; resumable like every backend."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from finegrain.cli.commands import command_config
from finegrain.cli.commands import label as label_main
from finegrain.config import build
from finegrain.errors import ConfigError
from finegrain.labeling import revisers
from finegrain.labeling.revise import ReviseConfig, make_reviser, run_revise
from finegrain.world.reviser import WorldReviser, register_reviser_backend


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """Registrations made here end with the test."""
    monkeypatch.setattr(revisers, "_REGISTRY", dict(revisers._REGISTRY))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _revise_config(world: Path, *args: str) -> ReviseConfig:
    """``finegrain label revise --world_dir WORLD ARGS`` as its parsed config (the world fills in what it may)."""
    return command_config("label revise", ReviseConfig, ["--world_dir", str(world), "--disable_tqdm", *args])


def test_world_reviser_on_its_pairs_and_resume(tmp_path):
    from finegrain.world.corpus import Perception, Sampler, make_prompt
    from finegrain.world.lexicon import TOPICS
    from finegrain.world.oracle import judge

    sampler, rng = Sampler(Perception.from_seed(0, 0.4, 1.0)), random.Random(3)
    pairs = []
    for k in range(8):
        topic = TOPICS[k % len(TOPICS)]
        prompt = make_prompt(topic)
        a, b = sampler.response(rng, topic), sampler.response(rng, topic)
        chosen, rejected = (a, b) if judge(prompt, a).score >= judge(prompt, b).score else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    perfect = make_prompt(TOPICS[0])
    pairs.append({"prompt": perfect, "chosen": "it is bad .", "rejected": "the " + TOPICS[0] + " is x ."})
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "pairs_train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "revisions.jsonl"
    # a directory without world.json: the default rules; a data set given, so the world fills in nothing
    cfg = _revise_config(tmp_path, "--dataset_name", str(data), "--reviser", "world", "--output_file", str(out),
                         "--max_edits", "1")
    assert cfg.backend == "world" and cfg.dataset_name == str(data)
    summary = run_revise(cfg)
    assert summary.revised + summary.unchanged == len(pairs) and summary.failed == 0 and summary.revised >= 6
    rows = _read(out)
    assert len(rows) == summary.revised
    for r in rows:
        assert judge(r["prompt"], r["revised"]).score > judge(r["prompt"], r["rejected"]).score
        assert r["chosen"] == pairs[r["index"]]["chosen"]
    again = run_revise(cfg)
    assert (again.revised, again.unchanged, again.skipped) == (0, 0, len(pairs))


def test_without_data_or_model_the_command_revises_the_worlds_pairs_with_its_rules(tiny_world, tmp_path, capsys):
    from finegrain.world import load_world_config
    from finegrain.world.oracle import judge

    out = tmp_path / "revisions.jsonl"
    cfg = _revise_config(tiny_world, "--output_file", str(out), "--limit", "12")
    assert cfg.dataset_name == str(tiny_world / "data" / "pairs_train.jsonl")
    assert cfg.reviser == cfg.backend == "world" and cfg.skip_invalid_rows
    world = load_world_config(tiny_world)
    reviser = make_reviser(cfg)
    assert isinstance(reviser, WorldReviser)
    assert (reviser.rules, reviser.max_edits) == (world.rules, world.revision_max_edits)
    assert make_reviser(_revise_config(tiny_world, "--output_file", str(out), "--max_edits", "1")).max_edits == 1
    summary = run_revise(cfg)
    assert summary.total == 12 and summary.failed == 0 and summary.revised > 0
    for r in _read(out):
        assert judge(r["prompt"], r["revised"], world.rules).score > judge(r["prompt"], r["rejected"], world.rules).score
    # the same through `finegrain label revise`: the first 12 rows are done, the next 8 are revised
    assert label_main(["revise", "--world_dir", str(tiny_world), "--output_file", str(out), "--limit", "20",
                       "--disable_tqdm"]) == 0
    printed = capsys.readouterr().out
    assert f"{summary.revised + summary.unchanged} already done (of 20 input rows)" in printed
    assert sorted({r["index"] for r in _read(out)}) == sorted(r["index"] for r in _read(out))  # none twice


def test_the_world_fills_in_nothing_when_a_model_or_data_set_is_named(tiny_world):
    cfg = _revise_config(tiny_world, "--output_file", "o.jsonl", "--dataset_name", "mine.jsonl", "--model", "m")
    assert (cfg.dataset_name, cfg.reviser, cfg.backend) == ("mine.jsonl", None, "openai")
    with pytest.raises(ConfigError, match="give --dataset_name"):  # a model alone: the world's pairs are not its
        _revise_config(tiny_world, "--output_file", "o.jsonl", "--model_name_or_path", "my-chat-model")


def test_world_reviser_options_say_what_to_change(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "describe the castle .", "chosen": "a .", "rejected": "b ."}) + "\n")
    register_reviser_backend(tmp_path)
    cfg = build(ReviseConfig, {"dataset_name": str(data), "output_file": str(tmp_path / "o.jsonl"), "model": "m",
                               "reviser": "world"})
    with pytest.raises(ConfigError, match=re.escape("drop --model_name_or_path")):
        run_revise(cfg)
    (tmp_path / "world.json").write_text("{not json")
    cfg = build(ReviseConfig, {"dataset_name": str(data), "output_file": str(tmp_path / "o.jsonl"), "reviser": "world"})
    with pytest.raises(ConfigError, match="rebuild the world"):
        run_revise(cfg)
