"""Fuzzed command lines and YAML config files: every bad value is a ConfigError naming the option, never a traceback.

Hypothesis draws (derandomized, so the figures in docs/reliability.md are reproducible):

* flag values: random unicode, empty strings, very long strings, numbers of the wrong kind, NaN / inf spellings,
  booleans for numbers, lists for scalars, for every option of every training command's config;
* unknown flags and keys (near-misses of real names and random junk);
* YAML files: scalars, lists, nested junk, non-string keys, unicode, ``.nan`` / ``.inf``, bad ``env:`` blocks,
  invalid YAML, bytes that are not UTF-8, deeply nested documents.

Each parse either succeeds (the value was valid) or raises :class:`ConfigError` whose message names the option (or,
for file-wide problems, the file). Anything else — a TypeError, an argparse SystemExit, a yaml or OS error — fails.
The data loaders have their own fuzz tests (tests/data/test_fuzz_loaders.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finegrain.config import TrainConfig, config_fields, parse
from finegrain.errors import ConfigError

EXAMPLES = 60  # per fuzz test and command; docs/reliability.md states the total (checked by test_reliability_doc)
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def config_classes() -> dict[str, type]:
    """The config dataclass of every training command whose module exists (found by import)."""
    out = {}
    for command in ("sft", "po", "rm", "ppo"):
        if importlib.util.find_spec(f"finegrain.trainers.{command}") is None:
            continue
        module = importlib.import_module(f"finegrain.trainers.{command}")
        classes = [c for c in vars(module).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
                   and issubclass(c, TrainConfig) and c.__module__.startswith(module.__name__)]
        if classes:
            out[command] = max(classes, key=lambda c: len(config_fields(c)))
    return out


CLASSES = config_classes()
COMMANDS = sorted(CLASSES)

junk_text = st.one_of(
    st.text(max_size=30),
    st.text(min_size=500, max_size=2000),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e999", "-1e999", "none", "null", "true", "false", "0",
                     "-1", "1.5", "1e-3", "0x10", "[1,2]", "{a: 1}", "--", "-", "é", "🙂", "\x00", "a,b,,c",
                     "9" * 40, "-" + "9" * 40]),
)
junk_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), junk_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)


def _check(cls, argv, prog, names):
    """Parse; a ConfigError must name one of ``names`` (option or file); any other exception fails the test."""
    try:
        cfg = parse(cls, argv, prog)
    except ConfigError as exc:
        msg = str(exc)
        assert any(n in msg for n in names), f"ConfigError does not name {names}: {msg}"
        assert len(msg) < 3000
        return None
    for f in config_fields(cls):  # accepted values are of their declared kinds
        v = getattr(cfg, f.name)
        if isinstance(v, float):
            assert math.isfinite(v), f"{f.name} accepted {v}"
    return cfg


@pytest.mark.parametrize("command", COMMANDS)
def test_fuzzed_flag_values(command):
    cls = CLASSES[command]
    fields = [f.name for f in config_fields(cls)]

    @FUZZ
    @given(name=st.sampled_from(fields), value=junk_text, kebab=st.booleans())
    def run(name, value, kebab):
        flag = "--" + (name.replace("_", "-") if kebab else name)
        # a value that starts with '-' reads as another option: the error then names that token
        names = [name, flag] + ([repr(value)[:40].rstrip("'")] if value.startswith("-") else [])
        _check(cls, [flag, value], f"finegrain {command}", names)

    run()


@pytest.mark.parametrize("command", COMMANDS)
def test_fuzzed_unknown_flags(command):
    cls = CLASSES[command]
    fields = [f.name for f in config_fields(cls)]

    @FUZZ
    @given(base=st.sampled_from(fields), mutation=st.text(alphabet="abcxyz_-0", min_size=1, max_size=4),
           junk=st.text(min_size=1, max_size=20), which=st.integers(0, 2))
    def run(base, mutation, junk, which):
        flag = ["--" + base + mutation, "--" + junk, junk][which]
        known = {"--" + f for f in fields} | {"--" + f.replace("_", "-") for f in fields} | {"--config", "-h", "--help"}
        if flag in known or any(k.startswith(flag) for k in known if flag.startswith("--") and len(flag) > 2):
            return  # a real option or an unambiguous abbreviation of one
        if which == 2 and not junk.startswith("-") and junk.strip():
            _check(cls, [junk], f"finegrain {command}", ["unexpected argument", "unknown option"])
            return
        token = flag.split("=")[0]
        _check(cls, [flag, "1"], f"finegrain {command}", [token, repr(token)[1:-1][:40], "argument"])

    run()


@pytest.mark.parametrize("command", COMMANDS)
def test_fuzzed_yaml_files(command, tmp_path):
    cls = CLASSES[command]
    fields = [f.name for f in config_fields(cls)]
    path = tmp_path / "c.yaml"

    @FUZZ
    @given(doc=st.one_of(
        st.dictionaries(st.sampled_from(fields), junk_value, min_size=1, max_size=4),
        st.dictionaries(st.text(max_size=12), junk_value, max_size=3),
        junk_value,
    ))
    def run(doc):
        try:
            text = yaml.safe_dump(doc, allow_unicode=True)
        except yaml.YAMLError:
            return
        path.write_text(text, encoding="utf-8")
        names = [str(path), "option", "env"] + fields + ([str(k) for k in doc] if isinstance(doc, dict) else [])
        _check(cls, ["--config", str(path)], f"finegrain {command}", names)

    run()


BAD_FILES = {
    "scalar": "3\n",
    "list": "- a\n- b\n",
    "string": "just text\n",
    "invalid yaml": "a: [1, 2\n",
    "tabs": "a:\n\t- 1\n",
    "non-string key": "1: 2\n",
    "null key": "null: 2\n",
    "complex key": "? [1, 2]\n: 3\n",
    "nan": "learning_rate: .nan\n",
    "inf": "learning_rate: .inf\n",
    "int inf": "max_steps: .inf\n",
    "huge seed": "seed: 99999999999999999999\n",
    "negative seed": "seed: -1\n",
    "env list": "env: [1, 2]\n",
    "env nested": "env: {A: {b: 1}}\n",
    "env nul": "env: {\"A\\0B\": 1}\n",
    "env equals": "env: {\"A=B\": 1}\n",
    "bool for int": "max_steps: true\n",
    "list for float": "learning_rate: [1]\n",
    "mapping for str": "output_dir: {a: 1}\n",
    "unknown choice": "optim: adafactorx\n",
    "unknown key": "learning_rat: 1e-3\n",
    "deep nesting": "a: " + "[" * 5000 + "]" * 5000 + "\n",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_junk_yaml_files(case, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BAD_FILES[case], encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        parse(CLASSES["sft"], ["--config", str(path)], "finegrain sft")
    msg = str(info.value)
    assert str(path) in msg or "option '" in msg or "unknown option" in msg, msg


def test_binary_and_missing_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00junk\x80")
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse(CLASSES["sft"], ["--config", str(path)], "finegrain sft")
    with pytest.raises(ConfigError, match="does not exist"):
        parse(CLASSES["sft"], ["--config", str(tmp_path / "missing.yaml")], "finegrain sft")
    with pytest.raises(ConfigError, match="does not exist"):
        parse(CLASSES["sft"], ["--config", str(tmp_path)], "finegrain sft")


def test_command_line_mistakes_name_the_option():
    cls = CLASSES["sft"]
    cases = {
        ("--learning_rate",): "--learning_rate",          # value missing
        ("--max_steps", "ten"): "max_steps",
        ("--learning_rate", "1e999"): "learning_rate",
        ("--learning_rate", "nan"): "learning_rate",
        ("--bf16", "maybe"): "bf16",
        ("--optim", "adam"): "optim",
        ("--learnig_rate", "1"): "learnig_rate",
        ("stray",): "unexpected argument",
        ("--seed", "-3"): "seed",
    }
    for argv, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            parse(cls, list(argv), "finegrain sft")
        assert expected in str(info.value), (argv, str(info.value))
    with pytest.raises(ConfigError, match="did you mean learning_rate"):
        parse(cls, ["--learnig_rate", "1"], "finegrain sft")


def fuzz_inputs_per_run() -> int:
    """How many inputs one run of this module tries (the figure docs/reliability.md states)."""
    per_command = 3 * EXAMPLES
    return per_command * len(COMMANDS) + len(BAD_FILES) + 3 + 10
