"""Reward-model quality on the built-in world, over several seeds: pairwise accuracy and token-credit AUROC.

For every seed, ``finegrain rm`` trains the four reward models from the world's SFT model (sequence and sentence
RMs on ``pairs_train``, 300 steps of 16 pairs, about 2.4 epochs, past which they overfit the 1,989 pairs; token RM
and TLCR discriminator on ``revisions`` with edit labels computed on the fly, 1,000 steps of 16 pairs), AdamW at
learning rate 1e-3 with a cosine schedule, and their final evaluation is read back from ``metrics.jsonl``:

* ``accuracy``: held-out pairwise accuracy on ``pairs_test`` (the score of the sequence / sentence RM, ``Σ_t r_t``
  of the token levels). The test labels are the world's Bradley-Terry-noised preferences, so the oracle itself
  agrees with about 76 % of them (``pair_label_agreement`` in ``world.json``) -- that is the ceiling;
* ``auroc``: token-credit AUROC against the world's ground-truth credit (``credit_test.jsonl``: positive-credit vs
  negative-credit words, neutral words left out) of the token RM, the discriminator (``2·P(+) − 1``) and the
  sentence RM spread over its sentences' tokens;

besides the defaults (sentence RM with inserted ``<END>`` tokens, discriminator with soft targets) two variants are
trained too: ``sentence_mark`` (boundaries marked, no inserted tokens) and ``discriminator_hard`` (hard labels on
changed tokens only);
* ``edit_auroc`` / ``edit_accuracy`` of the token levels on held-out revisions (the world's reviser on the test
  pairs): how well they learned what they were trained on.

Token sources that need no reward-model training are scored on the same credit rows: contrastive prompting
(T-REG, :class:`finegrain.rewards.contrastive.ContrastiveRewardSource` with the world's control prompts and the
SFT model; deterministic, one value) and the implicit DPO rewards ``β ρ_t`` of a policy trained by
``finegrain po --loss dpo`` for each seed (:class:`finegrain.rewards.implicit.ImplicitRewardSource`; left out with
a TODO line when that module is missing). Targets: token RM and discriminator AUROC >= 0.9; sentence RM accuracy >=
sequence RM accuracy. ``edit_label_lookup_auroc`` scores the credit words by per-(word, topic) statistics of the
training revisions' edit labels, no model (:func:`edit_label_lookup_auroc`): how much the labels themselves say about
the credit. Results (mean, sample standard deviation, min, max and every seed's value) go to
``bench/results/rm_quality.json``.

``--length_bias NAME=DIR ...`` measures instead, without training, how much trained reward models' sequence scores
follow response length (:func:`length_bias`: Pearson and Spearman correlation of each model's score -- ``Σ_t r_t``
for the token levels -- with the response's length in tokens on the world's held-out pairs, both responses, beside
the oracle's own correlation); docs/methods/token-rm.md reports it for the token RM.

Usage:

    .venv/bin/python bench/rm_quality.py                         # 3 seeds, about 15 minutes on 2 cores
    .venv/bin/python bench/rm_quality.py --seeds 0 --pair_steps 50 --edit_steps 50    # a quick look
    .venv/bin/python bench/rm_quality.py --length_bias token=runs/rm-token plain=runs/rm-token-plain \
        --out bench/results/token_rm_length_bias.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LEVELS = ("sequence", "sentence", "token", "discriminator")
TARGETS = {"token_auroc": 0.9, "discriminator_auroc": 0.9}
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sequence": ("sequence", ()),
    "sentence": ("sentence", ()),  # insert mode (<END> tokens), the SRM training layout
    "sentence_mark": ("sentence", ("--boundary_mode", "mark")),
    "token": ("token", ()),  # objective A
    "discriminator": ("discriminator", ()),  # soft targets (TLCR default)
    "discriminator_hard": ("discriminator", ("--hard_labels",)),
}
"""Reward models trained per seed: name -> (level, extra ``finegrain rm`` flags)."""


def _summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4), "values": [round(v, 4) for v in values]}


def _final_eval(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"][-1]


def train_rm(level: str, seed: int, out: Path, *, world: Path, steps: int, batch: int, lr: float,
             extra: list[str], name: str | None = None) -> dict:
    """Train one reward model with ``finegrain rm`` and return its final evaluation."""
    from finegrain.trainers.rm import RMConfig, load_inputs, train
    from finegrain.world.app import parse_config

    args = ["--level", level, "--world_dir", str(world), "--output_dir", str(out / f"{name or level}-{seed}"),
            "--overwrite_output_dir", "--seed", str(seed), "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "64",
            "--learning_rate", str(lr), "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05",
            "--logging_steps", str(max(1, steps // 4)), "--max_eval_samples", "1000", "--max_credit_samples", "1000",
            "--disable_tqdm", *extra]
    cfg = parse_config("rm", RMConfig, args)  # as `finegrain rm`: the world fills its data and base model
    return _final_eval(train(cfg, load_inputs(cfg)))


def _credit(world: Path, tokenizer, limit: int | None = None):
    from finegrain.trainers.rm import RMConfig, credit_items
    from finegrain.world.app import parse_config

    cfg = parse_config("rm", RMConfig, ["--world_dir", str(world)])
    return credit_items(str(world / "data" / "credit_test.jsonl"), tokenizer, cfg, limit=limit, skip=True)


def credit_auroc(source, items, pad_id: int) -> float:
    """Token-credit AUROC of any reward source on the world's credit rows (per word; world tokens are words)."""
    from finegrain.eval.metrics import evaluate_token_credit
    from finegrain.trainers.rm import score_credit

    scores, credit = score_credit(source, items, pad_id, reduce="sum", batch_size=64)
    return evaluate_token_credit(scores, credit).auroc


def contrastive_auroc(world: Path) -> float:
    """T-REG contrastive prompting with the world's SFT model and its control prompts."""
    from finegrain.models.loading import load_causal_lm, load_tokenizer
    from finegrain.rewards.contrastive import ContrastiveRewardSource
    from finegrain.world.app import world_control_template

    tok = load_tokenizer(str(world / "sft"))
    sft = load_causal_lm(str(world / "sft")).eval()
    source = ContrastiveRewardSource(sft, tok, world_control_template())
    return credit_auroc(source, _credit(world, tok), tok.pad_token_id)


def implicit_auroc(world: Path, seed: int, out: Path, *, steps: int, batch: int, lr: float, beta: float) -> float:
    """Implicit DPO token rewards ``β ρ_t`` of a policy trained by ``finegrain po --loss dpo``."""
    from finegrain.cli.commands import po
    from finegrain.models.loading import load_causal_lm, load_tokenizer
    from finegrain.rewards.implicit import ImplicitRewardSource

    run = out / f"dpo-{seed}"
    po(["--loss", "dpo", "--beta", str(beta), "--world_dir", str(world), "--output_dir", str(run),
             "--overwrite_output_dir", "--seed", str(seed), "--max_steps", str(steps),
             "--per_device_train_batch_size", str(batch), "--learning_rate", str(lr), "--lr_scheduler_type",
             "constant", "--warmup_steps", "10", "--logging_steps", str(max(1, steps // 4)), "--disable_tqdm",
             "--max_eval_samples", "64"])
    tok = load_tokenizer(str(world / "sft"))
    policy = load_causal_lm(str(run / "final")).eval()
    sft = load_causal_lm(str(world / "sft")).eval()
    return credit_auroc(ImplicitRewardSource(policy, beta, ref_model=sft), _credit(world, tok), tok.pad_token_id)


def edit_label_lookup_auroc(world: Path) -> dict:
    """What the edit labels can say about credit: AUROC of per-(word, topic) label statistics, no model.

    Every (word, prompt topic) of the training revisions counts how often it was labelled +1 (added or substituted
    in a revision), -1 (deleted or substituted in a rejected response) and how often it occurred; each credit word is
    then scored by ``(n_+ − n_−) / (n + 1)`` (what soft targets estimate) or ``(n_+ + ½) / (n_+ + n_− + 1)`` (what hard
    labels estimate). A context-free lookup of the labels, it shows how far the revisions' labels agree with the
    world's credit.
    """
    from collections import Counter

    from finegrain.data.alignment import edit_tags
    from finegrain.data.files import read_jsonl
    from finegrain.eval.metrics import evaluate_token_credit
    from finegrain.world.oracle import prompt_topic

    pos, neg, seen = Counter(), Counter(), Counter()
    for r in read_jsonl(world / "data" / "revisions.jsonl"):
        rejected, revised, topic = r["rejected"].split(), r["revised"].split(), prompt_topic(r["prompt"])
        tags_l, tags_e = edit_tags(rejected, revised)
        for words, tags, counter in ((rejected, tags_l, neg), (revised, tags_e, pos)):
            for w, tag in zip(words, tags):
                seen[w, topic] += 1
                counter[w, topic] += tag != "U"
    rows = read_jsonl(world / "data" / "credit_test.jsonl")

    def score(f) -> float:
        scores = [[f((w, prompt_topic(r["prompt"]))) for w in r["words"]] for r in rows]
        return evaluate_token_credit(scores, [r["credit"] for r in rows]).auroc

    return {"soft": round(score(lambda k: (pos[k] - neg[k]) / (seen[k] + 1)), 4),
            "hard": round(score(lambda k: (pos[k] + 0.5) / (pos[k] + neg[k] + 1)), 4)}


def _ranks(x: list[float]) -> list[float]:
    """Ranks 1..n, ties averaged."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def correlations(x: list[float], y: list[float]) -> dict:
    """Pearson and Spearman correlation of two equally long lists (None where one of them is constant)."""

    def corr(a, b):
        try:
            return round(statistics.correlation(a, b), 4)
        except statistics.StatisticsError:
            return None

    return {"pearson": corr(x, y), "spearman": corr(_ranks(x), _ranks(y))}


def length_bias(models: dict[str, str], world_dir: str | None = None, *, batch_size: int = 64) -> dict:
    """Length bias of reward models on the world's held-out pairs (``pairs_test``, chosen and rejected responses).

    For every model (a ``finegrain rm`` run or its ``final/``, read as a reward source with the world's tokenizer,
    options after ``:`` as in any reward spec) the response's score -- ``Σ_t r_t`` of its token rewards, the sequence
    RM's score -- is correlated with the response's length in tokens (EOS excluded), beside the oracle's own score
    (how much true quality follows length on these responses). Also reported: the pair accuracy of the score, and the
    accuracy of "the longer response wins", the baseline a length-farming score would match.

    Returns:
        ``{"n_responses", "oracle": {pearson, spearman}, "longer_wins_accuracy", NAME: {pearson, spearman,
        accuracy, score_per_token}}``.
    """
    from finegrain.data.collate import collate_completions, pad_token_id
    from finegrain.data.files import read_jsonl
    from finegrain.data.tokenize import tokenize_prompt, tokenize_response
    from finegrain.models.loading import load_tokenizer
    from finegrain.rewards.base import sequence_scores
    from finegrain.rewards.registry import SourceContext, reward_source
    from finegrain.world import ensure_world
    from finegrain.world.sources import register

    world = ensure_world(world_dir)
    register(world)
    tok = load_tokenizer(str(world / "sft"))
    pairs = [p for p in read_jsonl(world / "data" / "pairs_test.jsonl") if p["chosen"].strip() and p["rejected"].strip()]
    rows, lengths = [], []
    for p in pairs:
        for side in ("chosen", "rejected"):
            ids, _, n_text = tokenize_response(tok, p[side])
            rows.append({"prompt_input_ids": tokenize_prompt(tok, p["prompt"]), "completion_input_ids": ids,
                         "prompt": p["prompt"], "response": p[side]})
            lengths.append(float(n_text))

    def scores_of(source) -> list[float]:
        out = []
        for lo in range(0, len(rows), batch_size):
            part = rows[lo : lo + batch_size]
            batch = collate_completions([{k: r[k] for k in ("prompt_input_ids", "completion_input_ids")}
                                         for r in part], pad_token_id(tok))
            batch.prompts, batch.responses = [r["prompt"] for r in part], [r["response"] for r in part]
            with torch.no_grad():
                out += sequence_scores(source.token_rewards(batch)).double().tolist()
        return out

    context = SourceContext(tokenizer=tok)
    oracle = scores_of(reward_source("oracle", context))
    longer = [lengths[2 * i] > lengths[2 * i + 1] for i in range(len(pairs))]
    ties = sum(lengths[2 * i] == lengths[2 * i + 1] for i in range(len(pairs)))
    result: dict = {"n_responses": len(rows), "n_pairs": len(pairs), "mean_length": statistics.fmean(lengths),
                    "oracle": correlations(oracle, lengths),
                    "longer_wins_accuracy": round(sum(longer) / len(pairs), 4), "length_ties": ties,
                    "oracle_accuracy": round(statistics.fmean(float(oracle[2 * i] > oracle[2 * i + 1])
                                                              for i in range(len(pairs))), 4)}
    for name, spec in models.items():
        scores = scores_of(reward_source(spec, context))
        result[name] = {**correlations(scores, lengths),
                        "accuracy": round(statistics.fmean(float(scores[2 * i] > scores[2 * i + 1])
                                                           for i in range(len(pairs))), 4),
                        "score_per_token": round(sum(scores) / sum(lengths), 4), "spec": spec}
    return result


def run(*, seeds=(0, 1, 2), pair_steps: int = 300, edit_steps: int = 1000, batch: int = 16, lr: float = 1e-3,
        variants=tuple(VARIANTS),
        world_dir: str | None = None, work_dir: str | None = None, threads: int | None = None,
        contrastive: bool = True, implicit: bool = True, dpo_steps: int = 100, dpo_batch: int = 32,
        dpo_lr: float = 1e-4, beta: float = 0.1) -> dict:
    """Train and evaluate; return the results dictionary (see the module docstring)."""
    from finegrain.world import ensure_world

    if threads:
        torch.set_num_threads(threads)
    world = ensure_world(world_dir)
    start = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="rm_quality-") if work_dir is None else None
    out = Path(work_dir or tmp.name)
    per_seed: dict[str, list[dict]] = {name: [] for name in variants}
    notes: list[str] = []
    implicit_values: list[float] = []
    try:
        for seed in seeds:
            for name in variants:
                level, extra = VARIANTS[name]
                t0 = time.time()
                steps = pair_steps if level in ("sequence", "sentence") else edit_steps
                metrics = train_rm(level, seed, out, world=world, steps=steps, batch=batch, lr=lr, extra=list(extra),
                                   name=name)
                metrics["seconds"] = round(time.time() - t0, 1)
                per_seed[name].append(metrics)
                print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                            if isinstance(v, float) and k != "samples"),
                      file=sys.stderr, flush=True)
            if implicit:
                try:
                    import finegrain.rewards.implicit  # noqa: F401
                except ImportError:
                    if not notes:
                        notes.append("TODO: implicit DPO token rewards: finegrain.rewards.implicit is missing in this "
                                     "installation; rerun when the PO trainer provides it")
                else:
                    implicit_values.append(implicit_auroc(world, seed, out, steps=dpo_steps, batch=dpo_batch,
                                                          lr=dpo_lr, beta=beta))
                    print(f"seed {seed} implicit DPO auroc {implicit_values[-1]:.4f}", file=sys.stderr, flush=True)
        result: dict = {
            "settings": {"seeds": list(seeds), "steps": {"sequence, sentence": pair_steps, "token, discriminator":
                                                         edit_steps}, "batch_pairs": batch, "learning_rate": lr,
                         "scheduler": "cosine, 5% warm-up", "world_dir": str(world), "threads": torch.get_num_threads(),
                         "variants": {n: [VARIANTS[n][0], *VARIANTS[n][1]] for n in variants},
                         "dpo": {"steps": dpo_steps, "batch_pairs": dpo_batch, "learning_rate": dpo_lr, "beta": beta}},
            "pair_label_agreement": json.loads((world / "world.json").read_text()).get("pair_label_agreement"),
            "accuracy": {}, "auroc": {}, "edit_auroc": {}, "edit_accuracy": {}, "seconds": {},
        }
        for name, rows in per_seed.items():
            level = VARIANTS[name][0]
            result["accuracy"][name] = _summary([r.get("accuracy") for r in rows])
            result["seconds"][name] = _summary([r["seconds"] for r in rows])
            if level != "sequence":  # the sentence RM's token credit: a_j s_j spread over the sentence
                result["auroc"][name] = _summary([r.get("auroc") for r in rows])
            if level in ("token", "discriminator"):
                result["edit_auroc"][name] = _summary([r.get("edit_auroc") for r in rows])
                result["edit_accuracy"][name] = _summary([r.get("edit_accuracy") for r in rows])
        if contrastive:
            value = contrastive_auroc(world)
            result["auroc"]["contrastive"] = _summary([value])
            result["auroc"]["contrastive"]["note"] = "deterministic (frozen SFT model), one value"
        if implicit_values:
            result["auroc"]["implicit_dpo"] = _summary(implicit_values)
        result["edit_label_lookup_auroc"] = edit_label_lookup_auroc(world)
        result["notes"] = notes
        acc = result["accuracy"]
        checks = {}
        for name, level in (("token_auroc", "token"), ("discriminator_auroc", "discriminator")):
            if level in result["auroc"]:
                checks[name] = {"target": f">= {TARGETS[name]}", "mean": result["auroc"][level]["mean"],
                                "met": result["auroc"][level]["mean"] >= TARGETS[name]}
        for name in ("sentence", "sentence_mark"):
            if name in acc and "sequence" in acc:
                checks[f"{name}_vs_sequence_accuracy"] = {
                    "target": f"{name} >= sequence", name: acc[name]["mean"], "sequence": acc["sequence"]["mean"],
                    "met": acc[name]["mean"] >= acc["sequence"]["mean"]}
        result["targets"] = checks
        result["total_seconds"] = round(time.time() - start, 1)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def main() -> None:
    from finegrain.bench.cli import ScriptParser

    p = ScriptParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pair_steps", type=int, default=300, help="steps of the sequence and sentence RMs (16 pairs each)")
    p.add_argument("--edit_steps", type=int, default=1000, help="steps of the token RM and the discriminator")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--world_dir", default=None)
    p.add_argument("--work_dir", default=None, help="keep the run directories here (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no_contrastive", action="store_true")
    p.add_argument("--no_implicit", action="store_true")
    p.add_argument("--dpo_steps", type=int, default=100)
    p.add_argument("--out", default=None, help="results JSON (default bench/results/rm_quality.json, with "
                   "--length_bias bench/results/token_rm_length_bias.json)")
    p.add_argument("--length_bias", nargs="+", default=None, metavar="NAME=DIR",
                   help="only measure the length bias of these trained reward models (no training)")
    args = p.parse_args()
    if args.length_bias:
        if args.threads:
            torch.set_num_threads(args.threads)
        models = dict(spec.split("=", 1) for spec in args.length_bias)
        text = json.dumps(length_bias(models, args.world_dir), indent=2)
        print(text)
        out = Path(args.out or HERE / "results" / "token_rm_length_bias.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        return
    args.out = args.out or str(HERE / "results" / "rm_quality.json")
    result = run(seeds=tuple(args.seeds), pair_steps=args.pair_steps, edit_steps=args.edit_steps, batch=args.batch, lr=args.lr, variants=tuple(args.variants),
                 world_dir=args.world_dir, work_dir=args.work_dir, threads=args.threads,
                 contrastive=not args.no_contrastive, implicit=not args.no_implicit, dpo_steps=args.dpo_steps)
    text = json.dumps(result, indent=2)
    print(text)
    for note in result["notes"]:
        print(note, file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
