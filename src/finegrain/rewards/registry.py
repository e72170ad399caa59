"""One door from a reward spec to a reward source, for every command that takes one.

``finegrain ppo --reward``, ``ppo --judge``, ``finegrain eval --judge``, ``eval --token_credit`` and ``label
rewards`` read the same grammar (docs/reward-sources.md)::

    [NAME=]SPEC
    SPEC := DIR[:KEY=VALUE]...       a reward model saved by `finegrain rm` (its run directory or final/), with
                                     options of its loader or source (DIR:mode=sign:eos=model)
          | python:MODULE:FUNCTION   a function f(prompts, responses) -> one score or one list of token rewards per row
          | contrastive              contrastive prompting with the reference model (T-REG, Zhou et al. 2025, eq. 3)
          | implicit[:POLICY]        implicit token rewards of a DPO / TDPO-trained policy against the reference
          | KIND[:ARG]               a registered kind; applications add theirs (the built-in world's oracle[:credit])

``NAME=`` renames the source in logs and tables (a name has no ``/`` or ``:``). A new kind is one call of
:func:`register_reward_source` with a factory ``(arg, context) -> RewardSource``; the :class:`SourceContext`
carries what sources may need. Nothing here knows an application.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finegrain.errors import ConfigError
from finegrain.rewards.base import RewardSource

__all__ = [
    "SourceContext",
    "describe_reward_specs",
    "load_reward_source",
    "register_reward_source",
    "registered_sources",
    "reward_source",
    "reward_sources",
    "split_dir_options",
    "split_name",
]

_MODEL_OPTIONS = ("dtype", "double_softmax", "lag", "trust_remote_code", "splitter")


@dataclass
class SourceContext:
    """What a reward source may need besides its spec.

    Fields:
        tokenizer: the policy's tokenizer: rewards come back in its tokenization.
        device: where models run.
        load_model: ``path -> causal LM`` on ``device`` in eval mode (shared between sources), for specs that name
            a model directory (``implicit:DIR``); None: such specs are refused.
        reference: the reference model (an ``nn.Module``) or its directory, for ``contrastive`` and ``implicit``.
        reference_context: a zero-argument callable returning a context manager under which ``reference`` *is*
            the reference (a LoRA policy's ``disable_adapter``), or None.
        policy: the policy directory that a bare ``implicit`` refers to.
        contrastive_template: the :class:`~finegrain.rewards.contrastive.ContrastiveTemplate` of ``contrastive``
            (None: the draft-revision form).
        model_options: options of reward-model directories (:func:`load_reward_source` lists them); options
            written in a spec (``DIR:KEY=VALUE``) win.
        chunk_size: response positions per chunk of an output projection.
    """

    tokenizer: Any
    device: Any = "cpu"
    load_model: Callable[[str], Any] | None = None
    reference: Any = None
    reference_context: Callable[[], Any] | None = None
    policy: str | None = None
    contrastive_template: Any = None
    model_options: dict[str, Any] = field(default_factory=dict)
    chunk_size: int = 1024

    def model(self, what: Any, role: str) -> Any:
        """``what`` itself when it is a model, else loaded through :attr:`load_model`."""
        if what is None:
            raise ConfigError(f"this reward source needs the {role} model; name it (e.g. --reference)")
        if not isinstance(what, (str, Path)):
            return what
        if self.load_model is None:
            raise ConfigError(f"this command cannot load the {role} model {what} for a reward source")
        return self.load_model(str(what))


Factory = Callable[[str | None, SourceContext], RewardSource]
_REGISTRY: dict[str, tuple[Factory, str]] = {}  # kind -> (factory, summary)


def register_reward_source(kind: str, factory: Factory, summary: str = "") -> None:
    """Make ``KIND`` and ``KIND:ARG`` specs call ``factory(arg or None, context)``; a kind registered twice is
    replaced (an application re-registering with other settings)."""
    if not kind or ":" in kind or "=" in kind:
        raise ValueError(f"a reward-source kind is a plain word, got {kind!r}")
    _REGISTRY[kind] = (factory, summary)


def registered_sources() -> list[str]:
    """The registered kinds."""
    return sorted(_REGISTRY)


def describe_reward_specs() -> str:
    """One line per spec form, for ``--help`` texts and error messages."""
    lines = ["DIR (a finegrain rm run or its final/)"]
    lines += [f"{kind}{': ' + text if text else ''}" for kind, (_, text) in sorted(_REGISTRY.items())]
    return "; ".join(lines)


def split_name(spec: str) -> tuple[str | None, str]:
    """``NAME=SPEC`` -> ``(NAME, SPEC)``; a spec without ``=`` (or a path that exists) has no name, and neither
    has one whose text before the first ``=`` holds ``/`` or ``:`` (``DIR:mode=sign`` is a directory with options).

    Example:
        >>> split_name("tdpo=implicit:runs/po"), split_name("runs/rm:mode=sign"), split_name("d=runs/rm:mode=sign")
        (('tdpo', 'implicit:runs/po'), (None, 'runs/rm:mode=sign'), ('d', 'runs/rm:mode=sign'))
    """
    if "=" in spec and not Path(spec).exists():
        name, _, rest = spec.partition("=")
        if name and rest and not any(c in name for c in "/:"):
            return name, rest
    return None, spec


def _option_value(text: str) -> Any:
    """A spec option's value: ``true`` / ``false``, ``none``, an int, a float, else the text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_dir_options(body: str) -> tuple[str, dict[str, Any]] | None:
    """``DIR:KEY=VALUE:KEY=VALUE`` -> ``(DIR, {KEY: VALUE})`` when ``DIR`` is a directory and every part after it
    is ``KEY=VALUE`` (values typed by :func:`_option_value`); None otherwise. A directory that itself has a ``:`` in
    its name works: the longest prefix that is a directory is taken.

    Example:
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> split_dir_options(d + ":mode=sign:neutral_band=0.2:seed=3") == (d, {"mode": "sign", "neutral_band": 0.2,
        ...                                                                   "seed": 3})
        True
    """
    parts = body.split(":")
    for k in range(len(parts) - 1, 0, -1):
        head, rest = ":".join(parts[:k]), parts[k:]
        if all("=" in p and p.partition("=")[0] for p in rest) and Path(head).is_dir():
            options = {}
            for p in rest:
                key, _, value = p.partition("=")
                if key in options:
                    raise ConfigError(f"reward source {body!r}: option {key!r} given twice")
                options[key] = _option_value(value)
            return head, options
    return None


def load_reward_source(path: str | Path, *, policy_tokenizer: Any, device: Any = None, **options: Any) -> RewardSource:
    """The source of a reward model saved by ``finegrain rm`` (its run directory or ``final/``).

    Options go to the model loader (``dtype``, ``double_softmax``, ``lag``, ``trust_remote_code``, ``splitter``) or
    to the source (:func:`~finegrain.rewards.models.make_reward_source` lists them; the discriminator's,
    docs/methods/tlcr.md); an option nobody takes is a :class:`~finegrain.errors.ConfigError`.
    """
    from finegrain.models.reward_model import is_reward_model_dir, load_reward_model
    from finegrain.rewards.models import make_reward_source

    key = str(path)
    found = [d for d in (Path(key), Path(key) / "final") if Path(key).is_dir() and is_reward_model_dir(d)]
    if not found:
        what = ("a directory without a finegrain reward model (no finegrain_reward.json here or in final/)"
                if Path(key).is_dir() else "not a directory")
        raise ConfigError(f"reward source {key!r} is {what}; give the final/ directory of `finegrain rm`")
    model_options = {k: options.pop(k) for k in _MODEL_OPTIONS if k in options}
    model = load_reward_model(found[0], device=device, **model_options)
    return make_reward_source(model, policy_tokenizer, **options)


def reward_source(spec: str | Any, context: SourceContext) -> RewardSource:
    """The :class:`~finegrain.rewards.base.RewardSource` named by ``spec`` (module docstring); an object with a
    ``token_rewards`` method is returned as it is.

    Raises:
        ConfigError: an unknown kind, a directory that holds no reward model, or a source that needs a model the
            context does not have; the message lists the spec forms.
    """
    if not isinstance(spec, (str, Path)):
        if callable(getattr(spec, "token_rewards", None)):
            return spec
        raise ConfigError(f"reward source {spec!r} has no token_rewards(batch) method")
    name, body = split_name(str(spec))
    path, options = Path(body), {}
    if not path.is_dir() and (found := split_dir_options(body)) is not None:
        path, options = Path(found[0]), found[1]
    if path.is_dir():
        source = load_reward_source(path, policy_tokenizer=context.tokenizer, device=context.device,
                                    **{**dict(context.model_options), **options})
        label = path.parent.name if path.name == "final" else path.name
        source.name = name or label or source.name
        return source
    kind, sep, arg = body.partition(":")
    if kind not in _REGISTRY:
        why = "no such directory" if "/" in body or body.startswith(".") else f"unknown kind {kind!r}"
        raise ConfigError(f"reward source {body!r}: {why}; a reward spec is one of: "
                          f"{describe_reward_specs()}")
    source = _REGISTRY[kind][0](arg if sep else None, context)
    if name:
        source.name = name
    return source


def reward_sources(specs: Sequence[Any] | Mapping[str, Any], context: SourceContext,
                   reserved: Sequence[str] = ()) -> dict[str, RewardSource]:
    """Several sources, by unique name: a mapping gives the names, else each source's own (its class name when it has
    none); a name already taken or ``reserved`` gets ``#2``, ``#3``, ... Each ``source.name`` is set to its key."""
    items = list(specs.items()) if isinstance(specs, Mapping) else [(None, s) for s in specs]
    out: dict[str, RewardSource] = {}
    for given, spec in items:
        source = reward_source(spec, context)
        base = given or str(getattr(source, "name", type(source).__name__))
        name, k = base, 2
        while name in out or name in reserved:
            name, k = f"{base}#{k}", k + 1
        source.name = name
        out[name] = source
    return out


# ------------------------------------------------------------------------------------------ built-in kinds


def _python(arg: str | None, context: SourceContext) -> RewardSource:
    from finegrain.rewards.rule import FunctionRewardSource

    if not arg:
        raise ConfigError("reward source 'python:': write it as python:package.module:function")
    return FunctionRewardSource.from_spec(arg, context.tokenizer)


def _contrastive(arg: str | None, context: SourceContext) -> RewardSource:
    from finegrain.rewards.contrastive import ContrastiveRewardSource, ContrastiveTemplate, checked_template

    if arg:
        raise ConfigError("reward source 'contrastive' takes no argument; set the template with the command's "
                          "--contrastive_* options")
    reference = context.model(context.reference, "reference")
    template = checked_template(context.contrastive_template or ContrastiveTemplate("draft"), context.tokenizer)
    return ContrastiveRewardSource(reference, context.tokenizer, template, context=context.reference_context,
                                   chunk_size=context.chunk_size)


def run_info(policy_dir: Path) -> tuple[str | None, float | None]:
    """``(method, beta)`` of the run a policy directory belongs to (``RUN/final`` -> RUN's run.json, config.yaml)."""
    import yaml

    method = beta = None
    for run in (policy_dir.parent, policy_dir):
        if method is None and (run / "run.json").is_file():
            try:
                method = json.loads((run / "run.json").read_text()).get("method")
            except (OSError, ValueError):
                pass
        if beta is None and (run / "config.yaml").is_file():
            try:
                value = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("beta")
            except (OSError, yaml.YAMLError):
                value = None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                beta = float(value)
    return method, beta


def _implicit(arg: str | None, context: SourceContext) -> RewardSource:
    from finegrain.models.loading import model_dir
    from finegrain.rewards.implicit import ImplicitRewardSource

    target = arg or context.policy
    if not target:
        raise ConfigError("reward source 'implicit' needs a policy: write implicit:<policy_dir> (or pass --policy)")
    target = model_dir(target)
    if not Path(target).is_dir():
        raise ConfigError(f"implicit:{target}: no such model directory")
    method, beta = run_info(Path(target))
    if beta is None:
        beta = 1.0
        print(f"implicit rewards: no beta in the config of {target}; using beta = 1 (rankings and AUROC do not "
              "depend on it)", file=sys.stderr)
    kind = "tdpo" if method and method.lower().startswith("tdpo") else "dpo"
    source = ImplicitRewardSource(context.model(target, "policy"), beta,
                                  ref_model=context.model(context.reference, "reference"), kind=kind,
                                  chunk_size=context.chunk_size)
    source.name = f"implicit_{method}" if method else "implicit"
    return source


register_reward_source("python", _python, "python:MODULE:FUNCTION, a function (prompts, responses) -> scores")
register_reward_source("contrastive", _contrastive, "contrastive prompting with the reference (T-REG)")
register_reward_source("implicit", _implicit, "implicit[:POLICY_DIR], a DPO/TDPO policy's implicit token rewards")
