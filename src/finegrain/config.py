"""Config dataclasses drive YAML files, command-line flags and ``--help`` from one source.

Each command has one dataclass. Every field is declared with :func:`option`, which records its help text; the
parser accepts ``--config file.yaml`` plus flag overrides (precedence: defaults < YAML < flags, as TRL's
``TrlParser``), both ``--snake_case`` and ``--kebab-case`` spellings, ``--flag`` / ``--flag false`` /
``--no_flag`` for booleans, several values for list fields, and ``none`` for an optional field. A YAML file may
carry an ``env:`` mapping of environment variables to set (as in TRL). The flags are made from the dataclass by
``transformers.HfArgumentParser``; the values (flags and YAML alike) are converted and checked here
(:func:`build`), so unknown keys, wrong types and contradictory options fail at start with a
:class:`~finegrain.errors.ConfigError` that names the option and says what to change. No config string is ever
evaluated as code.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import importlib
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from finegrain.errors import ConfigError

C = TypeVar("C")
_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, default_factory: Any = _MISSING, aliases: tuple[str, ...] = ()):
    """Declare a config field with its help text (shown by ``--help`` and in shipped YAML comments)."""
    meta = {"help": help, "aliases": [f"--{a}" for a in aliases]}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_ranges(cfg: Any, *, positive: tuple[str, ...] = (), nonnegative: tuple[str, ...] = (),
                 unit_interval: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConfigError` naming the first option of ``cfg`` out of its range: ``positive`` options must be
    > 0, ``nonnegative`` ones >= 0, ``unit_interval`` ones in (0, 1] (``top_p``); NaN fails all three, an unset
    option (``None``) passes."""
    for names, bound, ok in ((positive, "> 0", lambda v: v > 0), (nonnegative, ">= 0", lambda v: v >= 0),
                             (unit_interval, "in (0, 1]", lambda v: 0 < v <= 1)):
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not ok(value):
                raise ConfigError(f"option '{name}' must be {bound}, got {value}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters so that an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a flag string) to the field type ``tp``, or raise ConfigError."""
    base, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and optional and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"option '{name}' needs a value of type {_type_name(base)}, got none")
    origin = get_origin(base)
    if origin is Literal:
        choices = get_args(base)
        if value not in choices:
            raise ConfigError(f"option '{name}' must be one of {', '.join(map(str, choices))}; got {_show(value)}")
        return value
    if origin in (list, tuple):
        (item_tp,) = get_args(base)[:1] or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(name, v, item_tp) for v in value]
    if origin is dict or base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"option '{name}' must be a mapping, got {_show(value)}")
        return dict(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"option '{name}' must be true or false, got {_show(value)}")
    if base in (int, float):
        try:  # a bool is no number here, nor a float with a fraction (or inf, nan) an integer
            fraction = base is int and isinstance(value, float) and not value.is_integer()
            if isinstance(value, bool) or fraction:
                raise ValueError
            out = base(value)
        except (TypeError, ValueError):
            kind = "an integer" if base is int else "a number"
            raise ConfigError(f"option '{name}' must be {kind}, got {_show(value)}") from None
        if base is float and not math.isfinite(out):
            raise ConfigError(f"option '{name}' must be a finite number, got {out}")
        return out
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"option '{name}' must be a string, got {_show(value)}")
        if "\0" in str(value):
            raise ConfigError(f"option '{name}' contains a NUL character")
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    base, optional = _unwrap_optional(tp)
    origin = get_origin(base)
    if origin is Literal:
        name = "{" + ",".join(map(str, get_args(base))) + "}"
    elif origin in (list, tuple):
        name = f"list[{_type_name(get_args(base)[0])}]"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} | None" if optional else name


def config_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def build(cls: type[C], values: dict[str, Any], source: str = "options") -> C:
    """Build ``cls`` from a mapping, coercing types and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in config_fields(cls)}
    aliases = {a.lstrip("-"): f.name for f in known.values() for a in f.metadata.get("aliases", ())}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"option names in {source} must be strings; got {_show(key)} (quote it or fix the indentation)")
        name = key.replace("-", "_")
        name = aliases.get(name, name)
        if name not in known:
            raise ConfigError(f"unknown option {_show(key)} in {source}{_suggest(name, list(known))}")
        kwargs[name] = _coerce(name, value, hints[name])
    missing = [n for n, f in known.items() if n not in kwargs and _default_of(f) is _MISSING]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config YAML file (a mapping); an ``env:`` mapping sets environment variables."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply to be a config") from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value, got {type(data).__name__}")
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        raise ConfigError(f"config file {p}: option 'env' must be a mapping of variable: value")
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k or not isinstance(v, (str, int, float, bool)) \
                or "\0" in str(v):
            raise ConfigError(f"config file {p}: option 'env' has an invalid entry {_show(k)}: {_show(v)} (names are strings "
                              "without '=' or NUL, values are scalars)")
    for k, v in env.items():
        os.environ[k] = str(v)
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls``, made by ``transformers.HfArgumentParser``: ``--name`` and ``--kebab-name``
    (and aliases), ``--flag`` / ``--flag false`` / ``--no_flag`` for booleans, several values for lists.

    The flags keep their values as strings and say nothing when not given: :func:`parse` lays them over the YAML
    file, :func:`build` converts and checks them (its messages name the option and cut long values). Each help line
    ends with the type and the default.
    """
    from transformers import HfArgumentParser

    hints = typing.get_type_hints(cls)
    for f in config_fields(cls):
        field = copy.copy(f)  # HfArgumentParser rewrites field.type; the class's own field stays as it is
        field.type = hints[f.name]
        first = len(parser._actions)
        HfArgumentParser._parse_dataclass_field(parser, field)
        default = _default_of(f)
        shown = "required" if default is _MISSING else f"default: {default!r}"
        for action in parser._actions[first:]:
            action.type, action.required, action.default = None, False, argparse.SUPPRESS
            action.help = (f"same as --{f.name} false" if action.nargs == 0 else  # --no_flag
                           f"{f.metadata.get('help', '')} [{_type_name(hints[f.name])}; {shown}]".replace("%", "%%"))
            if action.choices:  # checked by build, which accepts 'none' for an optional field
                action.metavar, action.choices = "{" + ",".join(map(str, action.choices)) + "}", None
            if action.nargs == "+":  # '--report_to' alone empties a list
                action.nargs = "*"


class CommandParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises :class:`ConfigError` (one clear line) instead of exiting with usage."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def make_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=prog, description=description, usage="%(prog)s [--config YAML] [--option VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, metavar="YAML", help="YAML file of options, or a shipped one by name (recipes/po-tdpo2: the paper recipes in finegrain/configs); flags given here override it")
    add_arguments(parser, cls)
    return parser


def resolve_config(path: str | None) -> str | None:
    """A ``--config`` value as a file: the path itself when it exists, else a config that ships with
    finegrain (``finegrain/configs``: ``recipes/`` for the papers, ``world/`` for the demo) by name
    (``recipes/po-tdpo2``, ``recipes/po-tdpo2.yaml`` or ``configs/recipes/po-tdpo2.yaml`` all name
    ``finegrain/configs/recipes/po-tdpo2.yaml``), else the path as given (loading it then says it is missing)."""
    if not path or Path(path).exists():
        return path
    name = path.removeprefix("configs/").removeprefix("./configs/")
    for candidate in (name, f"{name}.yaml"):
        shipped = Path(__file__).resolve().parent / "configs" / candidate
        if shipped.is_file():
            return str(shipped)
    return path


def parse(cls: type[C], argv: list[str] | None, prog: str, description: str = "") -> C:
    """Parse ``argv`` into ``cls``: defaults, then ``--config`` YAML, then flags."""
    parser = make_parser(cls, prog, description or (cls.__doc__ or ""))
    ns, unknown = parser.parse_known_args(argv)
    ns = vars(ns)
    if unknown:
        flags = [u for u in unknown if u.startswith("-")]
        known = [f.name for f in config_fields(cls)]
        if flags:
            name = flags[0].lstrip("-").split("=")[0].replace("-", "_")
            raise ConfigError(f"unknown option {_show(flags[0])}{_suggest(name, known)} (see {prog} --help)")
        raise ConfigError(f"unexpected argument {_show(unknown[0])}: options are given as --name value (see {prog} --help)")
    config_path = resolve_config(ns.pop("config", None))
    values: dict[str, Any] = load_yaml(config_path) if config_path else {}
    values.update(ns)
    return build(cls, values, source=f"config file {config_path}" if config_path else "options")


def dispatch(prog: str, argv: list[str] | None, commands: Mapping[str, str | Callable[[list[str]], Any]], usage: str,
             noun: str = "sub-command") -> int:
    """Run ``prog <name> [options]`` with ``commands[name]``: a function of the remaining arguments returning the exit
    status, or ``"module:function"``, imported only when it runs. No name, ``-h``, ``--help`` or ``help`` prints
    ``usage`` (status 0); an unknown name prints one line, with the closest name if there is one, and ``usage`` on
    stderr (status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        close = difflib.get_close_matches(name, list(commands), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"{prog}: unknown {noun} '{name}'{hint}\n\n{usage}", file=sys.stderr)
        return 2
    return int(load_function(commands[name])(rest) or 0)


def load_function(target: str | Callable) -> Callable:
    """``target`` itself, or the function a ``"module:function"`` string names (its module imported now)."""
    if not isinstance(target, str):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def non_defaults(cfg: Any) -> dict[str, Any]:
    """The options of ``cfg`` whose values differ from their defaults (what a run prints when it starts)."""
    out = {}
    for f in config_fields(type(cfg)):
        default, value = _default_of(f), getattr(cfg, f.name)
        if default is _MISSING or value != default:
            out[f.name] = value
    return out


def dump_yaml(cfg: Any, path: str | Path | None = None, *, comments: bool = False) -> str:
    """The config as YAML (optionally with each key's help as a comment); written to ``path`` if given."""
    data = {f.name: getattr(cfg, f.name) for f in config_fields(type(cfg))}
    if not comments:
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        hints = typing.get_type_hints(type(cfg))
        lines = []
        for f in config_fields(type(cfg)):
            lines.append(f"# {f.metadata.get('help', '')} [{_type_name(hints[f.name])}]")
            lines.append(yaml.safe_dump({f.name: data[f.name]}, sort_keys=False).rstrip())
        text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------------------
# Options shared by every training command. Names follow transformers / TRL where the concept is the same.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    """Options shared by every training command (sft, po, rm, ppo)."""

    # model and data
    model_name_or_path: str | None = option(None, "hub id or local path of the model; default: the built-in world's SFT model")
    tokenizer_name_or_path: str | None = option(None, "tokenizer; default: the model's")
    dataset_name: str | None = option(None, "hub id, local file (.jsonl/.json/.parquet/.csv) or directory; default: the built-in world's data")
    dataset_split: str = option("train", "split of dataset_name to train on")
    eval_dataset_name: str | None = option(None, "held-out data (same formats); default: the world's test split, or none for user data")
    eval_split: str = option("test", "split of eval_dataset_name (or of dataset_name when eval_dataset_name is not set)")
    max_train_samples: int | None = option(None, "use only the first N training rows")
    max_eval_samples: int | None = option(256, "use only the first N evaluation rows")
    skip_invalid_rows: bool = option(False, "skip bad rows (counted and logged) instead of stopping with an error")
    max_length: int = option(512, "maximum prompt + response tokens; longer responses are cut from the right")
    max_prompt_length: int = option(256, "maximum prompt tokens; longer prompts keep their end")
    trust_remote_code: bool = option(False, "allow models/tokenizers with custom code from the hub (off unless you ask)")
    # run directory
    output_dir: str | None = option(None, "run directory; default: runs/<command>-<method>")
    overwrite_output_dir: bool = option(False, "start afresh even if output_dir holds another run (its checkpoints, final model, metrics and run.json are deleted); without it such a directory is refused")
    resume_from_checkpoint: str | None = option(None, "checkpoint directory to resume from, or 'latest' for the newest in output_dir")
    # optimisation
    learning_rate: float = option(1e-5, "peak learning rate")
    optim: Literal["adamw", "rmsprop", "sgd"] = option("adamw", "optimizer")
    weight_decay: float = option(0.0, "decoupled weight decay")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.999, "Adam beta2")
    max_grad_norm: float = option(1.0, "gradient-norm clipping (0 disables)")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = option("linear", "learning-rate schedule after warm-up (transformers' get_scheduler; constant is its constant_with_warmup)")
    warmup_steps: int = option(0, "linear warm-up steps, from 0 to learning_rate")
    warmup_ratio: float = option(0.0, "warm-up as a fraction of the training steps, rounded up (used when warmup_steps is 0)")
    per_device_train_batch_size: int = option(8, "rows (pairs for preference data) per device per micro-step")
    per_device_eval_batch_size: int = option(16, "rows per device for evaluation")
    gradient_accumulation_steps: int = option(1, "micro-steps per optimizer step")
    num_train_epochs: float = option(1.0, "epochs over the training data (used when max_steps < 0)")
    max_steps: int = option(-1, "optimizer steps; -1: derived from num_train_epochs")
    seed: int = option(0, "random seed (data order, initialisation, sampling); 0 <= seed < 2**32")
    bf16: bool = option(False, "bfloat16 mixed precision")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    disable_dropout: bool = option(True, "turn dropout off in every model (as preference-optimisation recipes do)")
    # LoRA
    use_peft: bool = option(False, "train a LoRA adapter instead of all weights")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: list[str] = option(default_factory=lambda: ["all-linear"], help="modules that get LoRA adapters")
    # logging, evaluation, checkpoints
    logging_steps: int = option(10, "log training metrics every N optimizer steps")
    eval_steps: int = option(0, "evaluate every N optimizer steps (0: only at the end)")
    save_steps: int = option(0, "write a resumable checkpoint every N optimizer steps (0: none, except one on Ctrl-C or SIGTERM; the final model is saved at the end either way, but a killed run then has nothing to resume from)")
    save_total_limit: int = option(2, "keep only the newest N checkpoints")
    report_to: list[str] = option(default_factory=list, help="extra trackers: tensorboard, wandb (metrics.jsonl is always written)")
    max_nonfinite_steps: int = option(5, "stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)")
    disable_tqdm: bool = option(False, "hide progress bars")
    record_consumed: bool = option(False, "write each step's example indices to RUN_DIR/consumed.jsonl (shows that a resumed run repeats and skips nothing)")

    def __post_init__(self) -> None:
        check_ranges(self, positive=("per_device_train_batch_size", "per_device_eval_batch_size",
                                     "gradient_accumulation_steps", "max_length", "max_prompt_length",
                                     "max_nonfinite_steps"), nonnegative=("learning_rate", "warmup_steps"))
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
                "so that some response tokens fit; raise --max_length or lower --max_prompt_length"
            )
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ConfigError("nothing to train: set --max_steps > 0 or --num_train_epochs > 0")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"option 'seed' must be in [0, 2**32), got {self.seed}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ConfigError("--resume_from_checkpoint and --overwrite_output_dir contradict each other: drop one")
        for tracker in self.report_to:
            if tracker not in ("tensorboard", "wandb"):
                raise ConfigError(f"report_to: unknown tracker {_show(tracker)}; choose tensorboard and/or wandb")
        if self.tokenizer_name_or_path and not self.model_name_or_path:
            raise ConfigError("--tokenizer_name_or_path needs --model_name_or_path (the world's model has its own tokenizer)")
