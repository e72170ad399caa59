"""Every shipped YAML loads: the accelerate presets into accelerate's config class, and every file under
src/finegrain/configs/ (walked recursively; ``<command>-<name>.yaml``) into that command's config dataclass, as the
command line parses it (the world's option included). The expected counts are asserted, so a file added without a
test entry (or a folder the walk misses) fails here."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "src" / "finegrain" / "accelerate_configs"
CONFIG_DIRS = [ROOT / "configs", ROOT / "src" / "finegrain" / "configs"]
COMMANDS = ("sft", "po", "rm", "ppo")
EXPECTED_PRESETS = 5  # single_gpu, multi_gpu, fsdp2, zero2, zero3
EXPECTED_CONFIGS = 8 + 13  # world/: the demo's 4 reward models, 3 po runs, 1 ppo run; recipes/: 13 paper settings


def _yaml_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml")) if root.is_dir() else []


def test_every_accelerate_preset_loads_and_is_commented():
    from accelerate.commands.config.config_args import load_config_from_file

    from finegrain.cli.launch import PRESETS as NAMES
    from finegrain.cli.launch import preset_path

    files = _yaml_files(PRESETS)
    assert len(files) == EXPECTED_PRESETS
    assert sorted(f.stem for f in files) == sorted(NAMES)
    for f in files:
        cfg = load_config_from_file(str(f))
        assert cfg.mixed_precision == "no"  # finegrain's --bf16 decides
        assert preset_path(f.stem) == f
        keys = [ln for ln in f.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        uncommented = [ln for ln in keys if "#" not in ln and not ln.rstrip().endswith(":")]
        assert not uncommented, f"{f.name}: keys without a comment: {uncommented}"


def _config_class(command: str):
    from finegrain.config import TrainConfig

    module = importlib.import_module(f"finegrain.trainers.{command}")
    classes = [c for c in vars(module).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
               and issubclass(c, TrainConfig) and c.__module__.startswith(module.__name__)]
    return max(classes, key=lambda c: len(dataclasses.fields(c)))


def test_every_shipped_command_config_loads():
    from finegrain.config import parse
    from finegrain.world.app import with_world_options

    files = [f for d in CONFIG_DIRS for f in _yaml_files(d)]
    assert len(files) == EXPECTED_CONFIGS
    for f in files:
        command = f.stem.split("-")[0]
        assert command in COMMANDS, f"{f}: name it <command>-<name>.yaml with a command of {COMMANDS}"
        cfg = parse(with_world_options(_config_class(command)), ["--config", str(f)], f"finegrain {command}")
        assert cfg.max_steps > 0 or cfg.num_train_epochs > 0
        lines = [ln for ln in f.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert all("#" in ln for ln in lines if not ln.startswith("loss:")), f"{f.name}: comment every key"
        if f.parent.name == "recipes":  # each paper setting names its sources and how it runs
            text = f.read_text()
            assert "# Run: finegrain" in text and ("[code]" in text or "[paper]" in text or "[abs]" in text), f.name
            name = f"{f.parent.name}/{f.stem}"
            assert parse(with_world_options(_config_class(command)), ["--config", name], command) == cfg  # by name


def test_the_demo_reads_its_recipes_from_the_shipped_files():
    from finegrain.demo import PO_LOSSES, RM_LEVELS, recipe

    for name in [f"rm-{lv}" for lv in RM_LEVELS] + [f"po-{loss}" for loss in PO_LOSSES] + ["ppo-token-rm"]:
        args, steps = recipe(name)
        assert args[0] == "--config" and Path(args[1]).is_file() and steps > 0


@pytest.mark.parametrize("name", ["zero3", "multi_gpu"])
def test_launch_command_line(name):
    from finegrain.cli.launch import launch_command_line

    cmd = launch_command_line("sft", ["--accelerate_config", name, "--num-processes", "8", "--max_steps", "3"])
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert cmd[4].endswith(f"accelerate_configs/{name}.yaml")
    assert cmd[5:7] == ["--num_processes", "8"]
    assert cmd[-4:] == ["finegrain.cli.main", "sft", "--max_steps", "3"]


def test_launcher_errors_are_config_errors(tmp_path):
    from finegrain.cli.launch import launch_command_line
    from finegrain.errors import ConfigError

    for argv, msg in [(["--accelerate_config", "zero9"], "did you mean zero3"),
                      (["--accelerate_config", str(tmp_path / "x.yaml")], "no such file"),
                      (["--num_processes", "0"], "positive integer"),
                      (["--num_processes"], "needs a value")]:
        with pytest.raises(ConfigError, match=msg):
            launch_command_line("sft", argv)
    own = tmp_path / "mine.yaml"
    own.write_text((PRESETS / "multi_gpu.yaml").read_text())
    assert launch_command_line("sft", ["--accelerate_config", str(own)])[4] == str(own)
    assert launch_command_line("sft", ["--num_processes", "2"])[4].endswith("multi_gpu.yaml")
