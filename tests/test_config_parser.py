"""The config parser's contract (finegrain.config): ``--help`` lists every option with its help text and default,
``--snake_case`` and ``--kebab-case`` flags, ``--flag`` / ``--flag false`` for booleans, several values for list
fields, ``none`` for optional fields, aliases, required options, ``--config file.yaml`` under flags (with an ``env:``
mapping), and the run-time subclass the command line builds (:func:`finegrain.world.app.with_world_options`).
The fuzzed inputs (every bad value is a ConfigError naming the option) are in tests/reliability/test_fuzz_config.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import pytest

from finegrain.config import check_ranges, config_fields, dump_yaml, parse
from finegrain.errors import ConfigError

COMMANDS = {"sft": "finegrain.trainers.sft:SFTConfig", "po": "finegrain.trainers.po:POConfig",
            "rm": "finegrain.trainers.rm:RMConfig", "ppo": "finegrain.trainers.ppo:PPOConfig",
            "eval": "finegrain.eval.cli:EvalConfig", "label contrastive": "finegrain.labeling.contrastive:ContrastiveLabelConfig",
            "label edits": "finegrain.labeling.edits:EditsConfig", "label revise": "finegrain.labeling.revise:ReviseConfig"}


def _cls(command: str) -> type:
    module, name = COMMANDS[command].split(":")
    return getattr(importlib.import_module(module), name)


def _help_entries(text: str) -> dict[str, str]:
    """``{--option: its whole entry (invocation and help, whitespace collapsed)}`` from argparse's help."""
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            current = [line]
            for name in line.strip().split("  ")[0].split():  # the invocation, before the help text
                if name.startswith("--"):
                    entries.setdefault(name.rstrip(","), current)  # type: ignore[arg-type]
        elif current and line.startswith("   "):
            current.append(line)
        else:
            current = []
    return {name: " ".join(" ".join(lines).split()) for name, lines in entries.items()}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_option_with_its_help_and_default(command, capsys, monkeypatch):
    from finegrain.cli.commands import command_config

    monkeypatch.setenv("COLUMNS", "200")
    cls = _cls(command)
    with pytest.raises(SystemExit) as info:
        command_config(command, cls, ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    entries = _help_entries(out)
    from finegrain.world.app import with_world_options

    for f in config_fields(with_world_options(cls)):
        entry = entries.get(f"--{f.name}")
        assert entry is not None, f"--{f.name} missing from {command} --help"
        if "_" in f.name:
            assert f"--{f.name.replace('_', '-')}" in entry
        assert " ".join(f.metadata["help"].split()) in entry, (f.name, entry)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert "required" in entry, (f.name, entry)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert f"default: {default}" in entry or f"default: {default!r}" in entry, (f.name, entry)
    assert "--config" in entries


def test_kebab_case_flags_and_yaml_keys(tmp_path):
    from finegrain.trainers.sft import SFTConfig

    cfg = parse(SFTConfig, ["--max-steps", "3", "--learning-rate", "0.5", "--per_device_train_batch_size", "2"], "t")
    assert (cfg.max_steps, cfg.learning_rate, cfg.per_device_train_batch_size) == (3, 0.5, 2)
    path = tmp_path / "c.yaml"
    path.write_text("max-steps: 4\nlr-scheduler-type: cosine\n")
    cfg = parse(SFTConfig, ["--config", str(path)], "t")
    assert (cfg.max_steps, cfg.lr_scheduler_type) == (4, "cosine")


def test_booleans_as_flags_and_values():
    from finegrain.trainers.sft import SFTConfig

    assert parse(SFTConfig, [], "t").bf16 is False
    assert parse(SFTConfig, ["--bf16"], "t").bf16 is True
    assert parse(SFTConfig, ["--bf16", "--max_steps", "2"], "t").bf16 is True
    for word, value in [("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False),
                        ("on", True), ("off", False), ("False", False)]:
        assert parse(SFTConfig, ["--bf16", word], "t").bf16 is value
        assert parse(SFTConfig, ["--disable-dropout", word], "t").disable_dropout is value
    with pytest.raises(ConfigError, match="option 'bf16' must be true or false, got 'maybe'"):
        parse(SFTConfig, ["--bf16", "maybe"], "t")
    assert parse(SFTConfig, ["--no_disable_dropout"], "t").disable_dropout is False  # a default-true flag's negation
    assert parse(SFTConfig, ["--no-disable-dropout", "--bf16"], "t").disable_dropout is False


def test_list_fields_take_several_values(tmp_path):
    from finegrain.trainers.ppo import PPOConfig
    from finegrain.trainers.sft import SFTConfig

    cfg = parse(SFTConfig, ["--lora_target_modules", "q_proj", "v_proj", "--report-to", "tensorboard", "wandb"], "t")
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.report_to == ["tensorboard", "wandb"]
    assert parse(SFTConfig, ["--lora_target_modules", "q_proj"], "t").lora_target_modules == ["q_proj"]
    assert parse(SFTConfig, [], "t").lora_target_modules == ["all-linear"]
    path = tmp_path / "c.yaml"
    path.write_text("report_to: [tensorboard]\n")
    assert parse(SFTConfig, ["--config", str(path), "--report_to"], "t").report_to == []  # the flag alone empties it
    cfg = parse(PPOConfig, ["--reward", "oracle", "oracle:credit", "--reward_scales", "0.5", "2"], "t")
    assert cfg.reward_scales == [0.5, 2.0] and all(isinstance(s, float) for s in cfg.reward_scales)
    with pytest.raises(ConfigError, match="option 'reward_scales' must be a number, got 'x'"):
        parse(PPOConfig, ["--reward", "oracle", "oracle:credit", "--reward_scales", "0.5", "x"], "t")


def test_none_unsets_an_optional_option():
    from finegrain.trainers.po import POConfig
    from finegrain.trainers.sft import SFTConfig

    assert parse(SFTConfig, [], "t").max_eval_samples == 256
    assert parse(SFTConfig, ["--max_eval_samples", "none"], "t").max_eval_samples is None
    assert parse(SFTConfig, ["--max_eval_samples", "null"], "t").max_eval_samples is None
    assert parse(POConfig, ["--loss", "tdpo2", "--token_reduction", "none"], "t").token_reduction is None
    with pytest.raises(ConfigError, match="option 'max_steps' must be an integer, got 'none'"):
        parse(SFTConfig, ["--max_steps", "none"], "t")


def test_values_are_coerced_with_messages_that_name_the_option():
    from finegrain.trainers.sft import SFTConfig

    cases = {("--max_steps", "ten"): "option 'max_steps' must be an integer, got 'ten'",
             ("--max_steps", "1.5"): "option 'max_steps' must be an integer, got '1.5'",
             ("--learning_rate", "inf"): "option 'learning_rate' must be a finite number, got inf",
             ("--learning_rate", "x" * 500): "option 'learning_rate' must be a number, got 'xxxxx",
             ("--optim", "adam"): "optim",
             ("--output_dir", "a\0b"): "option 'output_dir' contains a NUL character",
             ("--max_length", "0"): "option 'max_length' must be > 0, got 0"}
    for argv, message in cases.items():
        with pytest.raises(ConfigError) as info:
            parse(SFTConfig, list(argv), "finegrain sft")
        assert message in str(info.value), (argv, str(info.value))
        assert len(str(info.value)) < 300  # long junk is cut: one readable line
    assert parse(SFTConfig, ["--learning_rate", "1e-3"], "t").learning_rate == 1e-3


def test_check_ranges_names_the_first_option_out_of_range():
    cfg = dataclasses.make_dataclass("C", [("a", float), ("b", float), ("c", object)])
    check_ranges(cfg(1.0, 0.0, None), positive=("a", "c"), nonnegative=("b",))  # None (unset) passes
    for values, message in {(0.0, 0.0, 1): "option 'a' must be > 0, got 0.0",
                            (1.0, -1e-9, 1): "option 'b' must be >= 0, got -1e-09",
                            (1.0, 0.0, -2): "option 'c' must be > 0, got -2",
                            (float("nan"), 0.0, 1): "option 'a' must be > 0, got nan"}.items():
        with pytest.raises(ConfigError) as info:
            check_ranges(cfg(*values), positive=("a", "c"), nonnegative=("b",))
        assert str(info.value) == message
    with pytest.raises(ConfigError, match="option 'b' must be >= 0, got nan"):
        check_ranges(cfg(1.0, float("nan"), 1), nonnegative=("b",))
    check_ranges(cfg(1.0, 1e-9, None), unit_interval=("a", "b", "c"))  # (0, 1]: both ends as written
    for a, b in ((1.0 + 1e-9, 0.5), (0.5, 0.0), (float("nan"), 0.5)):
        with pytest.raises(ConfigError, match=r"option '[ab]' must be in \(0, 1\], got"):
            check_ranges(cfg(a, b, None), unit_interval=("a", "b"))


def test_unknown_flags_and_stray_words():
    from finegrain.trainers.sft import SFTConfig

    with pytest.raises(ConfigError, match=r"unknown option '--max_stepz' \(did you mean max_steps"):
        parse(SFTConfig, ["--max_stepz", "3"], "finegrain sft")
    assert parse(SFTConfig, ["--max_ste", "3"], "t").max_steps == 3  # an unambiguous abbreviation
    with pytest.raises(ConfigError, match="unknown option '--zzz' .see finegrain sft --help"):
        parse(SFTConfig, ["--zzz"], "finegrain sft")
    with pytest.raises(ConfigError, match="unexpected argument 'stray': options are given as --name value"):
        parse(SFTConfig, ["stray"], "finegrain sft")
    with pytest.raises(ConfigError, match="finegrain sft: .*--learning_rate.*expected one argument"):
        parse(SFTConfig, ["--learning_rate"], "finegrain sft")


def test_aliases_and_required_options(tmp_path):
    from finegrain.labeling.edits import EditsConfig
    from finegrain.labeling.revise import ReviseConfig

    base = ["--output_file", "o", "--reviser", "openai", "--model", "m", "--dataset_name", "d"]
    assert parse(ReviseConfig, [*base, "--max_new_tokens", "7"], "t").max_tokens == 7
    assert parse(ReviseConfig, [*base, "--max-tokens", "8"], "t").max_tokens == 8
    with pytest.raises(ConfigError, match="missing required option.s.: output_file"):
        parse(EditsConfig, [], "finegrain label edits")
    path = tmp_path / "c.yaml"
    path.write_text("output_file: out.jsonl\nmax_new_tokens: 9\nreviser: openai\nmodel: m\ndataset_name: d\n")
    cfg = parse(ReviseConfig, ["--config", str(path)], "t")
    assert (cfg.output_file, cfg.max_tokens) == ("out.jsonl", 9)
    assert parse(ReviseConfig, ["--config", str(path), "--output_file", "x"], "t").output_file == "x"


def test_yaml_under_flags_over_defaults_and_env(tmp_path, monkeypatch):
    from finegrain.trainers.sft import SFTConfig

    monkeypatch.delenv("FINEGRAIN_TEST_ENV_A", raising=False)
    monkeypatch.delenv("FINEGRAIN_TEST_ENV_B", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("env:\n  FINEGRAIN_TEST_ENV_A: hello\n  FINEGRAIN_TEST_ENV_B: 3\n"
                    "max_steps: 5\nlearning_rate: 0.25\nbf16: true\nlora_target_modules: q_proj,v_proj\n"
                    "report_to: [tensorboard]\n")
    cfg = parse(SFTConfig, ["--config", str(path), "--learning_rate", "0.5", "--bf16", "false"], "t")
    assert (cfg.max_steps, cfg.learning_rate, cfg.bf16) == (5, 0.5, False)  # flags win over the file
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.report_to == ["tensorboard"]
    assert cfg.seed == 0 and cfg.dataset_split == "train"  # defaults under both
    assert os.environ["FINEGRAIN_TEST_ENV_A"] == "hello" and os.environ["FINEGRAIN_TEST_ENV_B"] == "3"
    assert "env" not in dataclasses.asdict(cfg)
    with pytest.raises(ConfigError, match=r"unknown option 'learning_rat' in config file .*c.yaml \(did you mean learning_rate"):
        path.write_text("learning_rat: 1\n")
        parse(SFTConfig, ["--config", str(path)], "t")
    with pytest.raises(ConfigError, match="option 'max_steps' must be an integer, got 'ten'"):
        path.write_text("max_steps: ten\n")
        parse(SFTConfig, ["--config", str(path)], "t")
    path.write_text("max_steps: 7.0\n")
    assert parse(SFTConfig, ["--config", str(path)], "t").max_steps == 7


def test_a_written_config_reads_back(tmp_path):
    from finegrain.trainers.po import POConfig

    cfg = parse(POConfig, ["--loss", "tdpo2", "--max_steps", "3", "--lora_target_modules", "q_proj", "k_proj"], "t")
    path = tmp_path / "config.yaml"
    dump_yaml(cfg, path)
    assert parse(POConfig, ["--config", str(path)], "t") == cfg
    commented = dump_yaml(cfg, comments=True)
    help_text = next(f.metadata["help"] for f in config_fields(POConfig) if f.name == "learning_rate")
    assert f"# {help_text} [float]\nlearning_rate: 5.0e-06\n" in commented


def test_the_command_line_subclass_with_world_options(tmp_path):
    from finegrain.trainers.sft import SFTConfig
    from finegrain.world.app import with_world_options

    cls = with_world_options(SFTConfig)
    cfg = parse(cls, ["--world-dir", str(tmp_path), "--max_steps", "2"], "finegrain sft")
    assert isinstance(cfg, SFTConfig) and cfg.world_dir == str(tmp_path) and cfg.max_steps == 2
    assert parse(cls, [], "finegrain sft").world_dir is None
    with pytest.raises(ConfigError, match="max_prompt_length"):  # the base class's checks still run
        parse(cls, ["--max_length", "8", "--max_prompt_length", "8"], "finegrain sft")
    assert [f.name for f in config_fields(cls)][-1] == "world_dir"


def test_the_class_is_left_as_it_is_and_every_parser_shows_defaults(capsys, monkeypatch):
    """Flags are made from copies of the fields (HfArgumentParser rewrites ``field.type``); commands with their own
    argparse parser (world build, demo) get the same flags and help."""
    from finegrain.trainers.sft import SFTConfig
    from finegrain.world.config import WorldConfig

    types_before = {f.name: f.type for f in dataclasses.fields(SFTConfig)}
    parse(SFTConfig, [], "t")
    assert {f.name: f.type for f in dataclasses.fields(SFTConfig)} == types_before
    monkeypatch.setenv("COLUMNS", "200")
    for main, argv, cls in [("finegrain.world.cli", ["build", "--help"], WorldConfig),
                            ("finegrain.demo", ["--help"], None)]:
        with pytest.raises(SystemExit):
            importlib.import_module(main).main(argv)
        entries = _help_entries(capsys.readouterr().out)
        cls = cls or importlib.import_module(main).DemoConfig
        for f in config_fields(cls):
            assert f"default: {f.default!r}" in entries[f"--{f.name}"], (main, f.name)
