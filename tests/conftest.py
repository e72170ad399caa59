"""Shared fixtures: seeds and default dtype reset for every test, and one tiny built-in world per session.

The tiny world is the real pipeline (corpus, SFT, sampling, pairs, revisions, credit) at small sizes; it takes
about 20 s on 2 cores and is shared by every test that needs a trained model or world data.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _reset_global_state():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


TINY_WORLD = dict(
    sft_examples=3000, sft_steps=250, sft_batch_size=64, sft_learning_rate=3e-3, hidden_size=64, train_prompts=300,
    test_prompts=80, rl_prompts=120, max_new_tokens=32,
)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small but complete world directory (see finegrain.world.build for its layout).

    Built once per test session. With ``FINEGRAIN_TEST_WORLD=DIR`` (a developer's option; CI leaves it unset) it is
    built into DIR once and reused by later sessions while its format and settings stay the same.
    """
    from finegrain.world import ensure_world, is_built, load_world_config
    from finegrain.world.config import WorldConfig

    cfg = WorldConfig(**TINY_WORLD)
    cached = os.environ.get("FINEGRAIN_TEST_WORLD")
    if cached:
        if is_built(cached) and load_world_config(cached) != cfg:
            import shutil

            shutil.rmtree(cached)  # built with other settings: rebuild
        return ensure_world(cached, cfg, quiet=True)
    from finegrain.world.build import build_world

    path = tmp_path_factory.mktemp("world")
    build_world(path, cfg, show_progress=False)
    return path
