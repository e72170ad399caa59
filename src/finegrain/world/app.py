"""The built-in world as an application on top of the library.

The library's commands know nothing of the world. The command line (:mod:`finegrain.cli.commands`) gives every
command the world's one option, ``--world_dir`` (:class:`WorldOptions`), registers the world's reward sources for
that world (:func:`register`: ``oracle``, ``oracle:credit``; its rule reviser for ``label revise``), and, when the
user names no model (or no prompts, for ``eval``), fills in the world's model, data and settings
(:func:`prepare`), as if the user had typed them:

=============  ====================================================================================================
command        filled in when the user named no model
=============  ====================================================================================================
sft            a freshly initialised base model (``<world>/base``) on the world's SFT corpus
po             the world's SFT model on its preference pairs (held-out: its test pairs); T-REG's contrastive
               template: the revision requests the SFT model was trained to follow (``--contrastive_template
               control``: its control prefixes)
rm             the SFT model as backbone, its pairs (or revisions for the token levels), its credit rows, revisions
               of its test pairs; the punctuation sentence splitter (the world's text is lowercase)
ppo            the SFT model on its RL prompts, reward ``oracle``, judge ``oracle``
eval           its test prompts, its SFT model as reference, judge ``oracle``, its response length; token credit
               against its credit rows
label          contrastive: the SFT model on its pairs; edits: its revisions with its tokenizer; revise: its
               rule reviser
=============  ====================================================================================================

World data hold a few empty samples of the SFT model: runs on them skip invalid rows (counted and logged).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from finegrain.config import option
from finegrain.errors import ConfigError

__all__ = ["WorldOptions", "base_model_dir", "parse_config", "credit_settings", "eval_settings", "prepare", "register", "with_world_options",
           "world_contrastive_template", "world_control_template"]


@dataclasses.dataclass
class WorldOptions:
    """The world's option, added to every command's config by the command line."""

    world_dir: str | None = option(None, "where the built-in world lives (built on first use when a command runs on "
                                         "it); default: $FINEGRAIN_HOME/world-<seed>-<difficulty>")


@functools.cache
def with_world_options(cls: type) -> type:
    """``cls`` with :class:`WorldOptions`' field added (last in ``--help``); the checks of ``cls`` still run."""
    return dataclasses.dataclass(type(cls.__name__, (WorldOptions, cls), {"__doc__": cls.__doc__,
                                                                           "__module__": cls.__module__}))


def register(world_dir: str | Path | None = None) -> None:
    """Register the world's reward sources and its reviser (``label revise --reviser world``) for the world at
    ``world_dir``."""
    from finegrain.world import sources
    from finegrain.world.reviser import register_reviser_backend

    sources.register(world_dir)
    register_reviser_backend(world_dir)


def base_model_dir(world: Path) -> Path:
    """``<world>/base``: the world's base architecture freshly initialised (the world's seed) with its tokenizer;
    written once, atomically, so ``finegrain sft`` on the world starts from a model directory like any other."""
    out = world / "base"
    if (out / "config.json").is_file():
        return out
    from finegrain.models.loading import load_tokenizer, save_pretrained
    from finegrain.world import load_world_config
    from finegrain.world.sft import base_model

    tokenizer = load_tokenizer(str(world / "sft"))
    tmp = world / f".tmp-base-{os.getpid()}"
    save_pretrained(base_model(load_world_config(world), tokenizer), tokenizer, tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process wrote it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _world(cfg: Any) -> Path:
    from finegrain.world import ensure_world

    world = ensure_world(getattr(cfg, "world_dir", None))
    cfg.world_dir = str(world)
    return world


def _data(world: Path, name: str) -> str:
    return str(world / "data" / f"{name}.jsonl")


def _no_data_without_model(command: str, cfg: Any) -> None:
    if cfg.dataset_name is not None:
        raise ConfigError(f"--dataset_name given without --model_name_or_path: the world's model only knows the "
                          f"world's words; pass the model for `finegrain {command}` to train")


def _sft(cfg: Any) -> None:
    _no_data_without_model("sft", cfg)
    world = _world(cfg)
    cfg.model_name_or_path = str(base_model_dir(world))
    cfg.dataset_name = _data(world, "sft")


def _po(cfg: Any) -> None:
    world = _world(cfg)
    cfg.model_name_or_path = str(world / "sft")
    if cfg.dataset_name is None:
        cfg.dataset_name = _data(world, "pairs_train")
    if cfg.eval_dataset_name is None:
        cfg.eval_dataset_name = _data(world, "pairs_test")
    cfg.skip_invalid_rows = True
    if cfg.loss.startswith("treg"):
        _control_template(cfg, "contrastive_template", "contrastive_positive", "contrastive_negative")


def eval_revisions_file(world: Path) -> str:
    """``<world>/data/revisions_test.jsonl``: revisions of the held-out pairs by the world's reviser (the held-out
    edit set of the token-level reward models), written once."""
    path = world / "data" / "revisions_test.jsonl"
    if not path.is_file():
        from finegrain.data.files import read_jsonl
        from finegrain.world import load_world_config
        from finegrain.world.build import make_revisions, write_jsonl

        wcfg = load_world_config(world)
        pairs = [p for p in read_jsonl(world / "data" / "pairs_test.jsonl") if p["rejected"].strip()]
        write_jsonl(path, make_revisions(pairs, wcfg.rules, wcfg.revision_max_edits, wcfg.seed + 7))
    return str(path)


def _rm(cfg: Any) -> None:
    _no_data_without_model("rm", cfg)
    world = _world(cfg)
    token_level = cfg.level in ("token", "discriminator")
    cfg.model_name_or_path = str(world / "sft")
    cfg.dataset_name = _data(world, "revisions" if token_level else "pairs_train")
    if cfg.eval_dataset_name is None:
        cfg.eval_dataset_name = _data(world, "pairs_test")
    if cfg.credit_dataset_name is None:
        cfg.credit_dataset_name = _data(world, "credit_test")
    if cfg.eval_revisions_name is None and token_level:
        cfg.eval_revisions_name = eval_revisions_file(world)
    if cfg.splitter is None:
        cfg.splitter = "punct"  # the world's text is lowercase: every terminator ends a sentence
    cfg.skip_invalid_rows = True


def _ppo(cfg: Any) -> None:
    world = _world(cfg)
    cfg.model_name_or_path = str(world / "sft")
    own_prompts = cfg.dataset_name is not None
    if not own_prompts:
        cfg.dataset_name = _data(world, "prompts_rl")
        if cfg.eval_dataset_name is None:
            cfg.eval_dataset_name = _data(world, "prompts_test")
        if cfg.judge is None:
            cfg.judge = "oracle"
    if not cfg.reward:
        cfg.reward = ["oracle"]


def _eval(cfg: Any) -> None:
    from finegrain.world import load_world_config

    world = None
    if cfg.policy and cfg.prompts is None:
        world = _world(cfg)
        cfg.prompts = _data(world, "prompts_test")
        cfg.reference = cfg.reference or str(world / "sft")
        cfg.judge = cfg.judge or "oracle"
        if cfg.max_new_tokens is None:
            cfg.max_new_tokens = load_world_config(world).max_new_tokens
    if cfg.token_credit and cfg.credit_data is None:
        world = world or _world(cfg)
        cfg.credit_data = _data(world, "credit_test")
        cfg.reference = cfg.reference or str(world / "sft")
        _control_template(cfg, "contrastive_template", "contrastive_positive", "contrastive_negative")


WORLD_FORMS = ("draft", "control")
"""The contrastive forms the world's SFT model was trained to follow (docs/world.md)."""


def world_contrastive_template(form: str = "auto"):
    """Contrastive prompting on the world (T-REG; docs/methods/treg.md), in the words its SFT model was trained on.

    ``"draft"`` (also ``"auto"``, the default): the paper's revision form, the requests ``please improve : {prompt}
    draft : {draft}`` / ``please worsen : ...`` (:data:`finegrain.world.corpus.REVISION_REQUEST`); ``"control"``: the
    prefixes ``please answer well :`` / ``please answer badly :`` without the response (the world's form before
    format 3).
    """
    from finegrain.rewards.contrastive import ContrastiveTemplate
    from finegrain.world.corpus import CONTROL_PREFIX, REVISION_REQUEST

    form = "draft" if form == "auto" else form
    if form not in WORLD_FORMS:
        raise ValueError(f"the world's contrastive forms are {', '.join(WORLD_FORMS)}; got {form!r}")
    texts = REVISION_REQUEST if form == "draft" else CONTROL_PREFIX
    return ContrastiveTemplate(form, texts["good"], texts["bad"])


def world_control_template():
    """The world's default contrastive template, :func:`world_contrastive_template` ``()`` (the revision form since
    world format 3; the name is older); the control prefixes are ``world_contrastive_template("control")``."""
    return world_contrastive_template()


def _control_template(cfg: Any, form: str, positive: str, negative: str) -> None:
    """Fill the config's contrastive template fields with the world's words: ``auto`` becomes the revision form
    (``draft``); ``draft`` or ``control`` without texts get the world's texts of that form."""
    chosen = getattr(cfg, form)
    if chosen == "auto" or (chosen in WORLD_FORMS and getattr(cfg, positive) is None and getattr(cfg, negative) is None):
        template = world_contrastive_template(chosen)
        setattr(cfg, form, template.form)
        setattr(cfg, positive, getattr(cfg, positive) or template.positive)
        setattr(cfg, negative, getattr(cfg, negative) or template.negative)


def eval_settings(world_dir: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`finegrain.eval.cli.evaluate_policy` that evaluate on the world (its held-out
    prompts, judge ``oracle`` with its rules, its response length), for Python callers; ``overrides`` win."""
    from finegrain.world import ensure_world, load_world_config

    world = ensure_world(world_dir)
    register(world)
    return {"prompts": _data(world, "prompts_test"), "judge": "oracle",
            "max_new_tokens": load_world_config(world).max_new_tokens, **overrides}


def credit_settings(world_dir: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`finegrain.eval.token_credit.evaluate_token_credit_sources` that score token
    credit on the world (its credit rows, its SFT model as the reference, its revision template for ``contrastive``)
    for Python callers; ``overrides`` win."""
    from finegrain.world import ensure_world

    world = ensure_world(world_dir)
    register(world)
    return {"data": _data(world, "credit_test"), "reference": str(world / "sft"),
            "contrastive_template": world_contrastive_template(), **overrides}


def _label_contrastive(cfg: Any) -> None:
    world = _world(cfg)
    cfg.model_name_or_path = str(world / "sft")
    if cfg.dataset_name is None:
        cfg.dataset_name = _data(world, "pairs_train")
    _control_template(cfg, "template", "positive", "negative")


def _label_edits(cfg: Any) -> None:
    world = _world(cfg)
    cfg.dataset_name = _data(world, "revisions")
    cfg.tokenizer_name_or_path = cfg.tokenizer_name_or_path or str(world / "sft")
    cfg.skip_invalid_rows = True  # as documented: a world's few invalid revision rows are skipped and counted


def _label_revise(cfg: Any) -> None:
    world = _world(cfg)
    cfg.dataset_name = _data(world, "pairs_train")
    cfg.reviser = cfg.reviser or "world"
    cfg.skip_invalid_rows = True


_FILL = {
    "sft": (lambda c: c.model_name_or_path is None, _sft),
    "po": (lambda c: c.model_name_or_path is None, _po),
    "rm": (lambda c: c.model_name_or_path is None, _rm),
    "ppo": (lambda c: c.model_name_or_path is None, _ppo),
    "eval": (lambda c: (c.policy and c.prompts is None) or (c.token_credit and c.credit_data is None), _eval),
    "label contrastive": (lambda c: c.model_name_or_path is None, _label_contrastive),
    "label edits": (lambda c: c.dataset_name is None, _label_edits),
    "label revise": (lambda c: c.dataset_name is None and not (c.model_name_or_path or c.model or c.base_url),
                     _label_revise),
}


def parse_config(command: str, cls: type, argv: list[str] | None, description: str | None = None) -> Any:
    """``finegrain <command> argv`` as a config: ``cls`` plus ``--world_dir`` parsed, then :func:`prepare`d (what the
    command line does; also for Python callers such as the benchmarks)."""
    from finegrain.config import parse

    cfg = parse(with_world_options(cls), argv, f"finegrain {command}",
                description if description is not None else (cls.__doc__ or ""))
    prepare(command, cfg)
    return cfg


def prepare(command: str, cfg: Any) -> bool:
    """Register the world's sources for ``cfg.world_dir`` and, when the user named no model (no prompts for
    ``eval``), fill in the world's inputs (module docstring). Returns whether the run is on the world."""
    register(getattr(cfg, "world_dir", None))
    claims, fill = _FILL.get(command, (lambda c: False, None))
    if not claims(cfg):
        return False
    fill(cfg)
    register(cfg.world_dir)  # now that the world is built, with its own rules
    return True
