"""``finegrain world build DIR``: tokenizer, SFT base model and every data set of the world.

A world directory holds ``world.json`` (config, summary, finegrain version), ``sft/`` (the SFT base policy in Hugging
Face format, safetensors, and its tokenizer) and ``data/``: ``sft``, ``pairs_train``, ``pairs_test`` (held out),
``revisions``, ``credit_test``, ``prompts_rl`` and ``prompts_test`` (held out) ``.jsonl``, whose columns
docs/world.md ("The data sets") lists.

Preference pairs are two samples of the SFT model for the same prompt, labelled by the oracle with
Bradley-Terry noise: the first is chosen with probability ``sigmoid((s1 - s2) / bt_temperature)``.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from finegrain.data import files
from finegrain.world.config import WORLD_FORMAT, WorldConfig
from finegrain.world.corpus import Perception, Sampler, eval_prompts, revision_corpus, sft_corpus
from finegrain.world.oracle import OracleRules, judge
from finegrain.world.reviser import revise

write_jsonl = functools.partial(files.write_jsonl, ensure_ascii=True)
"""Write rows as JSON Lines atomically, non-ASCII escaped, as every world file has been written."""


def make_pairs(prompts: list[str], samples: list[tuple[str, str]], rules: OracleRules, bt_temperature: float,
               seed: int) -> list[dict[str, Any]]:
    """Label two samples per prompt with Bradley-Terry noise; identical samples and empty samples make no pair."""
    rng = random.Random(f"pairs-{seed}")
    pairs = []
    for prompt, (a, b) in zip(prompts, samples):
        if a.strip() == b.strip():
            continue
        sa, sb = judge(prompt, a, rules).score, judge(prompt, b, rules).score
        p_a = 1.0 / (1.0 + math.exp(-(sa - sb) / bt_temperature))
        if rng.random() < p_a:
            chosen, rejected, sc, sr = a, b, sa, sb
        else:
            chosen, rejected, sc, sr = b, a, sb, sa
        if not a.strip() or not b.strip():  # an empty sample is no response; dropped after the draw, so the
            continue  # labels of the other pairs do not depend on it
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                      "chosen_score": sc, "rejected_score": sr})
    return pairs


def make_revisions(pairs: list[dict[str, Any]], rules: OracleRules, max_edits: int, seed: int,
                   sides: str = "both") -> list[dict[str, Any]]:
    """Minimal edits (1..max_edits, drawn per row) of each pair's rejected response, and of its chosen one too when
    ``sides == "both"``; responses with nothing to fix, or whose only fix deletes them entirely, are left out.

    Every row is ``{prompt, rejected, revised, chosen}``: ``rejected`` is the response before revision (the pair's
    chosen response for a chosen-side row) and ``chosen`` the pair's chosen response.
    """
    rng = random.Random(f"revisions-{seed}")
    out = []
    for p in pairs:
        for side in ("rejected", "chosen") if sides == "both" else ("rejected",):
            revised = revise(p["prompt"], p[side], max_edits=rng.randint(1, max_edits), rules=rules, rng=rng)
            if revised is not None and revised.strip():  # deleting a whole response is no revision to learn from
                out.append({"prompt": p["prompt"], "rejected": p[side], "revised": revised, "chosen": p["chosen"]})
    return out


def credit_rows(prompts: list[str], responses: list[str], rules: OracleRules) -> list[dict[str, Any]]:
    rows = []
    for prompt, response in zip(prompts, responses):
        j = judge(prompt, response, rules)
        if j.words:
            rows.append({"prompt": prompt, "response": response, "words": j.words, "credit": j.credit, "score": j.score})
    return rows


def summarize(prompts: list[str], responses: list[str], rules: OracleRules) -> dict[str, float]:
    """Mean oracle score, well-formed rate and mean length (words) of responses."""
    judged = [judge(p, r, rules) for p, r in zip(prompts, responses)]
    n = max(1, len(judged))
    return {
        "mean_reward": sum(j.score for j in judged) / n,
        "well_formed_rate": sum(j.well_formed for j in judged) / n,
        "mean_words": sum(len(j.words) for j in judged) / n,
    }


def build_world(out_dir: str | Path, cfg: WorldConfig | None = None, *, show_progress: bool = True) -> dict[str, Any]:
    """Build the world into ``out_dir`` and return its summary (also written to ``world.json``)."""
    cfg = cfg or WorldConfig()
    from finegrain.world.sft import sample_responses, train_base_model
    from finegrain.world.tokenizer import build_tokenizer

    t0 = time.time()
    out = Path(out_dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rules = cfg.rules
    sampler = Sampler(Perception.from_seed(cfg.seed, cfg.fidelity, cfg.misperception_scale))
    tokenizer = build_tokenizer()

    corpus = sft_corpus(sampler, cfg.sft_examples, cfg.seed)
    corpus += revision_corpus(sampler, cfg.revision_rows, cfg.seed)
    write_jsonl(data / "sft.jsonl", corpus)
    model, sft_stats = train_base_model(cfg, corpus, tokenizer, out / "sft", show_progress=show_progress)

    train_prompts = eval_prompts(cfg.train_prompts, cfg.seed * 1000 + 1)
    test_prompts = eval_prompts(cfg.test_prompts, cfg.seed * 1000 + 2)
    rl_prompts = eval_prompts(cfg.rl_prompts, cfg.seed * 1000 + 3)
    sampled = sample_responses(model, tokenizer, train_prompts + test_prompts, num_samples=2, cfg=cfg,
                               show_progress=show_progress)
    train_samples, test_samples = sampled[: len(train_prompts)], sampled[len(train_prompts):]
    pairs_train = make_pairs(train_prompts, train_samples, rules, cfg.bt_temperature, cfg.seed)
    pairs_test = make_pairs(test_prompts, test_samples, rules, cfg.bt_temperature, cfg.seed + 1)
    revisions = make_revisions(pairs_train, rules, cfg.revision_max_edits, cfg.seed, cfg.revision_sides)
    credit = credit_rows([p for p in test_prompts for _ in range(2)], [s for pair in test_samples for s in pair], rules)
    write_jsonl(data / "pairs_train.jsonl", pairs_train)
    write_jsonl(data / "pairs_test.jsonl", pairs_test)
    write_jsonl(data / "revisions.jsonl", revisions)
    write_jsonl(data / "credit_test.jsonl", credit)
    write_jsonl(data / "prompts_rl.jsonl", [{"prompt": p} for p in rl_prompts])
    write_jsonl(data / "prompts_test.jsonl", [{"prompt": p} for p in test_prompts])

    first = [s[0] for s in test_samples]
    label_agreement = sum(
        (p["chosen_score"] > p["rejected_score"]) for p in pairs_test if p["chosen_score"] != p["rejected_score"]
    ) / max(1, sum(p["chosen_score"] != p["rejected_score"] for p in pairs_test))
    summary = {
        "format": WORLD_FORMAT,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "vocab_size": len(tokenizer),
        "sft_examples": cfg.sft_examples,
        "sft_revision_examples": len(corpus) - cfg.sft_examples,
        "pairs_train": len(pairs_train),
        "pairs_test": len(pairs_test),
        "revisions": len(revisions),
        "credit_examples": len(credit),
        "prompts_rl": len(rl_prompts),
        "prompts_test": len(test_prompts),
        "sft": {**sft_stats, **summarize(test_prompts, first, rules)},
        "corpus_mean_reward": summarize([r["prompt"] for r in corpus[:2000]], [r["completion"] for r in corpus[:2000]], rules)["mean_reward"],
        "pair_label_agreement": label_agreement,
        "seconds": round(time.time() - t0, 1),
    }
    from finegrain import __version__

    summary["finegrain_version"] = __version__
    (out / "world.json").write_text(json.dumps(summary, indent=2))
    return summary
