"""The reward registry: one spec grammar for every command (ppo --reward, eval --judge / --token_credit)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from finegrain.errors import ConfigError
from finegrain.rewards import registry
from finegrain.rewards.registry import SourceContext, register_reward_source, reward_source, reward_sources
from finegrain.types import CompletionBatch, TokenRewards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _tiny_tokenizers import bpe_tokenizer, word_tokenizer  # noqa: E402


class Constant:
    """A toy source: ``value`` on every response token."""

    def __init__(self, value: float, name: str = "constant"):
        self.value, self.name = value, name

    def token_rewards(self, batch: CompletionBatch) -> TokenRewards:
        mask = batch.completion_mask.to(torch.bool)
        return TokenRewards(values=mask.float() * self.value, mask=mask)


@pytest.fixture
def constant_kind():
    """A kind registered in one line, as an application registers its own (removed after the test)."""
    register_reward_source("constant", lambda arg, ctx: Constant(float(arg or 1.0)), "constant[:VALUE]")
    yield
    registry._REGISTRY.pop("constant", None)


def test_a_new_kind_is_one_registration(constant_kind):
    ctx = SourceContext(tokenizer=word_tokenizer())
    assert reward_source("constant", ctx).value == 1.0
    assert reward_source("constant:2.5", ctx).value == 2.5
    named = reward_source("mine=constant:3", ctx)  # NAME=SPEC renames
    assert named.name == "mine" and named.value == 3.0
    assert "constant[:VALUE]" in registry.describe_reward_specs()


def test_several_sources_get_unique_names(constant_kind):
    ctx = SourceContext(tokenizer=word_tokenizer())
    sources = reward_sources(["constant", "constant:2", "x=constant"], ctx)
    assert list(sources) == ["constant", "constant#2", "x"]
    sources = reward_sources({"a": "constant", "b": Constant(5.0)}, ctx)  # a mapping names them; objects pass through
    assert list(sources) == ["a", "b"] and sources["b"].value == 5.0
    # a reserved name is suffixed as a taken one; each source carries its key as its name
    sources = reward_sources(["truth=constant", "constant", "constant"], ctx, reserved=("truth",))
    assert list(sources) == ["truth#2", "constant", "constant#2"]
    assert [s.name for s in sources.values()] == list(sources)


def test_unknown_specs_list_the_grammar(tmp_path):
    ctx = SourceContext(tokenizer=word_tokenizer())
    with pytest.raises(ConfigError, match="unknown kind 'nope'.*python:MODULE:FUNCTION"):
        reward_source("nope", ctx)
    with pytest.raises(ConfigError, match="no such directory"):
        reward_source("runs/missing/final", ctx)
    with pytest.raises(ConfigError, match="no finegrain_reward.json"):
        reward_source(str(tmp_path), ctx)
    with pytest.raises(ConfigError, match="token_rewards"):
        reward_source(object(), ctx)


def test_python_functions_and_models_the_context_lacks(tmp_path, monkeypatch):
    (tmp_path / "scores.py").write_text(textwrap.dedent("""
        def length(prompts, responses):
            return [float(len(r.split())) for r in responses]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ctx = SourceContext(tokenizer=word_tokenizer())
    assert reward_source("python:scores:length", ctx).name == "length"
    with pytest.raises(ConfigError, match="python:package.module:function"):
        reward_source("python:", ctx)
    with pytest.raises(ConfigError, match="needs the reference model"):
        reward_source("contrastive", ctx)  # no reference in the context
    with pytest.raises(ConfigError, match="needs a policy"):
        reward_source("implicit", ctx)
    with pytest.raises(ConfigError, match="takes no argument"):
        reward_source("contrastive:x", ctx)


def test_the_world_registers_its_oracle_with_its_rules():
    from finegrain.world.app import register

    register(None)
    ctx = SourceContext(tokenizer=word_tokenizer())
    assert reward_source("oracle", ctx).dense is False
    assert reward_source("oracle:credit", ctx).dense is True
    with pytest.raises(ConfigError, match="oracle's modes"):
        reward_source("oracle:bogus", ctx)


def test_the_add_a_reward_source_page_works_as_written():
    """docs/reward-sources.md's example registers a kind in one call; the kind then scores a batch as documented."""
    import re
    import types

    doc = (Path(__file__).resolve().parents[2] / "docs" / "reward-sources.md").read_text()
    code = re.search(r"```python\n# my_rewards.py\n(.*?)```", doc, re.S).group(1)
    module = types.ModuleType("my_rewards")
    try:
        exec(compile(code, "docs/reward-sources.md", "exec"), module.__dict__)  # our own docs, in a test
        tok = bpe_tokenizer()
        ids = tok("a 1 b 2", add_special_tokens=False)["input_ids"]  # a, " ", 1, " ", b, " ", 2
        batch = CompletionBatch(torch.tensor([[1]]), torch.tensor([[1]]), torch.tensor([ids]),
                                torch.ones(1, len(ids), dtype=torch.bool))
        source = reward_source("digits:0.5", SourceContext(tokenizer=tok))
        assert source.token_rewards(batch).values.tolist() == [[0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.5]]
    finally:
        registry._REGISTRY.pop("digits", None)
