"""``finegrain eval`` on the tiny world: exact results for identical models, metrics against naive recomputation,
eval.json / samples.jsonl format, judges, the command line and its errors."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from finegrain.cli.commands import eval_command as main
from finegrain.errors import ConfigError
from finegrain.eval.cli import EvalConfig, default_output_dir, evaluate_policy
from finegrain.models.loading import ModelCache, load_causal_lm, load_tokenizer
from finegrain.types import TokenRewards
from finegrain.world.app import eval_settings

# The keys of docs/run-directory.md's eval.json, with their types (None allowed for a standard error).
EVAL_KEYS = {
    "policy": str, "reference": str, "judge": str, "num_prompts": int, "win_rate": float, "tie_rate": float,
    "mean_reward": float, "ref_mean_reward": float, "seq_kl": float, "entropy": float, "distinct_1": float,
    "distinct_2": float, "length": float, "well_formed_rate": float,
}
EXTRA_KEYS = {
    "prompts": str, "num_samples": int, "num_responses": int, "loss_rate": float, "mean_reward_stderr": float,
    "ref_mean_reward_stderr": float, "seq_kl_stderr": float, "seq_kl_k1": float, "ref_entropy": float,
    "ref_distinct_1": float, "ref_distinct_2": float, "ref_length": float, "truncated_rate": float,
    "ref_truncated_rate": float, "ref_well_formed_rate": float, "temperature": float, "top_p": float, "top_k": int,
    "max_new_tokens": int, "seed": int, "tie_tolerance": float,
}
SAMPLE_KEYS = {"prompt", "sample", "response", "ref_response", "reward", "ref_reward", "seq_kl", "entropy", "length",
               "ref_length", "truncated", "ref_truncated"}


@pytest.fixture(scope="module")
def sft(tiny_world):
    return tiny_world / "sft"


@pytest.fixture(scope="module")
def perturbed(tiny_world, tmp_path_factory):
    """A copy of the tiny world's SFT model with small Gaussian noise on every weight (a 'trained policy')."""
    model = load_causal_lm(str(tiny_world / "sft"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(out)
    load_tokenizer(str(tiny_world / "sft")).save_pretrained(out)
    return out


def read_samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_identical_models_tie_everywhere_with_zero_kl(tiny_world, sft, perturbed, tmp_path):
    """The same model as policy and reference, sampled with the same seed, draws the same responses: every
    comparison is a tie (win 0, tie 1, loss 0 exactly), the full-vocabulary KL is exactly 0 (same logits), and
    every per-model statistic is equal. So does a separately loaded copy of the weights, and so does a reference
    side reused from a shared ModelCache (sampled during the evaluation of another policy)."""
    cache = ModelCache(torch.device("cpu"))
    other = evaluate_policy(perturbed, sft, **eval_settings(tiny_world), max_prompts=8, models=cache)
    assert len(cache.reference_samples) == 1
    res = evaluate_policy(sft, sft, **eval_settings(tiny_world), max_prompts=8, output_dir=tmp_path / "same", models=cache)
    assert len(cache.reference_samples) == 1 and res["ref_mean_reward"] == other["ref_mean_reward"]
    assert (res["win_rate"], res["tie_rate"], res["loss_rate"]) == (0.0, 1.0, 0.0)
    assert res["seq_kl"] == 0.0 and res["seq_kl_k1"] == 0.0
    for key in ("mean_reward", "entropy", "distinct_1", "distinct_2", "length", "well_formed_rate"):
        assert res[key] == res[f"ref_{key}"], key
    rows = read_samples(tmp_path / "same")
    assert all(r["response"] == r["ref_response"] and r["reward"] == r["ref_reward"] for r in rows)

    tok = load_tokenizer(str(sft))
    copy = evaluate_policy(load_causal_lm(str(sft)), load_causal_lm(str(sft)), tokenizer=tok, **eval_settings(tiny_world),
                           max_prompts=8)
    assert (copy["tie_rate"], copy["seq_kl"]) == (1.0, 0.0)
    assert copy["mean_reward"] == res["mean_reward"]


def test_eval_json_and_samples_format(tiny_world, sft, perturbed, tmp_path):
    out = tmp_path / "run"
    res = evaluate_policy(perturbed, sft, **eval_settings(tiny_world), max_prompts=10, num_samples=2, batch_size=8,
                          output_dir=out)
    data = json.loads((out / "eval.json").read_text())
    assert data == res
    for key, tp in {**EVAL_KEYS, **EXTRA_KEYS}.items():
        assert key in data, key
        assert isinstance(data[key], tp) or (tp is float and isinstance(data[key], int)), (key, data[key])
    assert data["judge"] == "oracle" and data["num_prompts"] == 10 and data["num_responses"] == 20
    assert math.isclose(data["win_rate"] + data["tie_rate"] + data["loss_rate"], 1.0, abs_tol=1e-12)
    assert data["seq_kl"] > 0 and 0 <= data["well_formed_rate"] <= 1
    assert json.loads((out / "run.json").read_text())["command"] == "eval"

    rows = read_samples(out)
    assert len(rows) == 20 and [r["sample"] for r in rows[:4]] == [0, 1, 0, 1]
    assert all(SAMPLE_KEYS | {"well_formed", "ref_well_formed"} == set(r) for r in rows)
    assert rows[0]["prompt"] == rows[1]["prompt"] != rows[2]["prompt"]
    # eval.json is the aggregate of samples.jsonl: recount the comparisons and the means.
    delta = [r["reward"] - r["ref_reward"] for r in rows]
    assert data["win_rate"] == sum(d > 1e-6 for d in delta) / 20
    assert data["loss_rate"] == sum(d < -1e-6 for d in delta) / 20
    assert math.isclose(data["mean_reward"], sum(r["reward"] for r in rows) / 20, abs_tol=1e-12)
    assert math.isclose(data["ref_mean_reward"], sum(r["ref_reward"] for r in rows) / 20, abs_tol=1e-12)
    assert math.isclose(data["seq_kl"], sum(r["seq_kl"] for r in rows) / 20, rel_tol=1e-9)
    assert math.isclose(data["length"], sum(r["length"] for r in rows) / 20, abs_tol=1e-12)
    # The standard error is over prompts: the standard deviation of the per-prompt means over sqrt(10).
    means = [(rows[2 * i]["reward"] + rows[2 * i + 1]["reward"]) / 2 for i in range(10)]
    mu = sum(means) / 10
    se = math.sqrt(sum((m - mu) ** 2 for m in means) / 9 / 10)
    assert math.isclose(data["mean_reward_stderr"], se, rel_tol=1e-9)


def test_kl_and_entropy_match_a_naive_forward(tiny_world, sft, perturbed, tmp_path):
    """Per response, seq_kl = Σ_t Σ_v p(v) (log p(v) − log q(v)) and entropy = mean_t −Σ_v p(v) log p(v), with p
    the policy's and q the reference's next-token distributions, from one plain forward of prompt + response in
    float64 (no padding, no chunks)."""
    from finegrain.data.tokenize import tokenize_prompt, tokenize_response

    out = tmp_path / "kl"
    evaluate_policy(perturbed, sft, **eval_settings(tiny_world), max_prompts=6, output_dir=out)
    tok = load_tokenizer(str(sft))
    policy, reference = load_causal_lm(str(perturbed)).double(), load_causal_lm(str(sft)).double()
    checked = 0
    for row in read_samples(out):
        ids, _, _ = tokenize_response(tok, row["response"], add_eos=not row["truncated"])
        if len(ids) != row["length"]:  # the text does not round-trip (a special token was sampled): skip
            continue
        prompt = tokenize_prompt(tok, row["prompt"])
        x = torch.tensor([prompt + ids])
        p_log = F.log_softmax(policy(x).logits[0, len(prompt) - 1 : -1], dim=-1)
        q_log = F.log_softmax(reference(x).logits[0, len(prompt) - 1 : -1], dim=-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)
        entropy = -(p_log.exp() * p_log).sum(-1)
        assert row["seq_kl"] == pytest.approx(kl.sum().item(), rel=1e-4, abs=1e-5)
        assert row["entropy"] == pytest.approx(entropy.mean().item(), rel=1e-4, abs=1e-5)
        checked += 1
    assert checked >= 4


def test_function_judge_and_reward_source_judge(tiny_world, sft, perturbed, tmp_path):
    """A python function judges the decoded texts; a reward source judges the batch: with values 1 on every
    response token and no seq_reward its score is the masked sum, i.e. the response length in tokens."""

    def words(prompts, responses):
        assert len(prompts) == len(responses) and all(isinstance(p, str) for p in prompts)
        return [len(r.split()) for r in responses]

    res = evaluate_policy(perturbed, sft, **eval_settings(tiny_world, judge=words), max_prompts=6, output_dir=tmp_path / "f")
    assert res["judge"] == "words" and "well_formed_rate" not in res
    rows = read_samples(tmp_path / "f")
    assert all(r["reward"] == len(r["response"].split()) and r["ref_reward"] == len(r["ref_response"].split())
               for r in rows)

    class Ones:
        name = "ones"

        def token_rewards(self, batch):
            mask = batch.completion_mask.bool()
            return TokenRewards(values=mask.float(), mask=mask)

    res = evaluate_policy(perturbed, sft, **eval_settings(tiny_world, judge=Ones()), max_prompts=6,
                          output_dir=tmp_path / "s")
    assert res["judge"] == "ones"
    rows = read_samples(tmp_path / "s")
    assert all(r["reward"] == r["length"] and r["ref_reward"] == r["ref_length"] for r in rows)
    assert res["mean_reward"] == pytest.approx(res["length"])


def test_judge_errors(tiny_world, sft):
    with pytest.raises(ValueError, match="returned 1 items for 2 responses"):
        evaluate_policy(sft, sft, **eval_settings(tiny_world, judge=lambda p, r: [0.0]), max_prompts=2)
    with pytest.raises(FloatingPointError, match="non-finite"):
        evaluate_policy(sft, sft, **eval_settings(tiny_world, judge=lambda p, r: [math.nan] * len(r)), max_prompts=2)
    with pytest.raises(ConfigError, match="no such directory"):
        evaluate_policy(sft, sft, **eval_settings(tiny_world, judge="no/such/dir"), max_prompts=2)
    with pytest.raises(ConfigError, match="unknown kind 'oracel'.*oracle"):  # the message lists the spec forms
        evaluate_policy(sft, sft, **eval_settings(tiny_world, judge="oracel"), max_prompts=2)


def test_command_line_writes_into_the_policy_run_directory(tiny_world, sft, tmp_path, capsys):
    run = tmp_path / "runs" / "dpo"
    shutil.copytree(sft, run / "final")
    (run / "run.json").write_text(json.dumps({"command": "po", "method": "dpo", "status": "completed"}))
    assert default_output_dir(run / "final") == default_output_dir(run) == run
    assert default_output_dir(sft).name == "eval-sft"
    code = main(["--policy", str(run), "--reference", str(sft), "--world_dir", str(tiny_world),  # RUN means RUN/final
                 "--max_prompts", "4", "--disable_tqdm"])
    assert code == 0
    table = capsys.readouterr().out
    assert "win / tie / loss" in table and "seq KL" in table and "wrote" in table
    assert json.loads((run / "eval.json").read_text())["num_prompts"] == 4
    assert len(read_samples(run)) == 4
    assert json.loads((run / "run.json").read_text())["method"] == "dpo"  # the run's own run.json is kept


def test_config_errors(tiny_world, sft, tmp_path):
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        EvalConfig()
    with pytest.raises(ConfigError, match="--reference"):
        EvalConfig(policy="x", prompts="p.jsonl")
    with pytest.raises(ConfigError, match="top_p"):
        EvalConfig(policy="x", top_p=0.0)
    with pytest.raises(ConfigError, match="num_samples"):
        EvalConfig(policy="x", num_samples=0)
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "finegrain_reward.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a reward model"):
        evaluate_policy(tmp_path / "rm", sft, **eval_settings(tiny_world))


def test_reference_with_another_vocabulary_is_refused(tiny_world, sft):
    from finegrain.models.build import causal_lm_from_config, tiny_llama_config

    other = causal_lm_from_config(tiny_llama_config(50, hidden_size=16, num_layers=1, num_heads=2))
    with pytest.raises(ConfigError, match="different vocabularies"):
        evaluate_policy(sft, other, **eval_settings(tiny_world), max_prompts=2)
