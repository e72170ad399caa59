"""``finegrain po``: smoke runs of every loss on the tiny world, the reference paths, precomputation and resume."""

import copy
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from finegrain.cli.commands import command_config
from finegrain.config import parse
from finegrain.errors import ConfigError
from finegrain.trainers import po, po_reference

pytestmark = pytest.mark.smoke


def _cfg(tiny_world, out, *extra):
    args = ["--world_dir", str(tiny_world), "--output_dir", str(out), "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "16", "--max_eval_samples", "16", "--logging_steps", "1",
            "--disable_tqdm", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant"]
    return command_config("po", po.POConfig, args + list(extra))


def _rows(run_dir, split="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def _fake_acc():
    return types.SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"), is_main_process=True)


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_and_contradictions():
    assert parse(po.POConfig, [], "po").beta == 0.1
    simpo = parse(po.POConfig, ["--loss", "simpo"], "po")
    assert (simpo.beta, simpo.gamma, simpo.alpha) == (2.0, 1.0, None)
    assert parse(po.POConfig, ["--loss", "tdpo2"], "po").alpha == 0.5
    assert parse(po.POConfig, ["--loss", "treg-dpo", "--alpha", "0.25"], "po").alpha == 0.25
    bad = {
        "alpha is used by tdpo2": ["--loss", "dpo", "--alpha", "0.5"],
        "SimPO's margin": ["--loss", "tdpo2", "--gamma", "1"],
        "conservative DPO": ["--loss", "simpo", "--label_smoothing", "0.1"],
        "T-REG option": ["--loss", "dpo", "--reg_source", "external"],
        "full distribution": ["--loss", "tdpo1", "--precompute_ref_log_probs"],
        "uses no reference": ["--loss", "simpo", "--precompute_ref_log_probs"],
        "option 'beta' must be > 0": ["--beta", "0"],
        "option 'alpha' must be >= 0, got -1": ["--loss", "tdpo2", "--alpha", "-1"],
    }
    for message, argv in bad.items():
        with pytest.raises(ConfigError, match=message):
            parse(po.POConfig, argv, "po")
    # T-REG on SimPO needs the reference only for reference-based token rewards
    parse(po.POConfig, ["--loss", "treg-simpo", "--precompute_ref_log_probs"], "po")
    with pytest.raises(ConfigError, match="uses no reference"):
        parse(po.POConfig, ["--loss", "treg-simpo", "--reg_source", "external", "--precompute_ref_log_probs"], "po")


def _stats(seed=0, b=3, t=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2 * b, t, generator=g) > 0.3
    mask[:, 0] = True
    return po.PreferenceStats(
        token_logps=-torch.rand(2 * b, t, generator=g, dtype=torch.float64) * 3, mask=mask,
        ref_token_logps=-torch.rand(2 * b, t, generator=g, dtype=torch.float64) * 3,
        token_kl=torch.rand(2 * b, t, generator=g, dtype=torch.float64),
        token_rewards=torch.rand(2 * b, t, generator=g, dtype=torch.float64) - 0.5)


def test_resolved_losses_match_the_formulas_on_the_batch_layout():
    """Chosen rows [0, B), rejected rows [B, 2B); sums over masked tokens; formulas of docs/methods/tdpo.md and treg.md."""
    s = _stats()
    b = 3

    def seq(x):
        return [sum(float(x[i, j]) for j in range(x.shape[1]) if s.mask[i, j]) for i in range(2 * b)]

    pi, ref, kl, r = seq(s.token_logps), seq(s.ref_token_logps), seq(s.token_kl), s.token_rewards
    n = [int(s.mask[i].sum()) for i in range(2 * b)]
    def ls(x):
        return F.logsigmoid(torch.tensor(x, dtype=torch.float64))

    def m(i):  # DPO log-ratio margin of pair i
        return (pi[i] - ref[i]) - (pi[b + i] - ref[b + i])

    for name, want in {
        "dpo": [-ls(0.1 * m(i)) for i in range(b)],
        "simpo": [-ls(2.0 * (pi[i] / n[i] - pi[b + i] / n[b + i]) - 1.0) for i in range(b)],
        "tdpo1": [-ls(0.1 * (m(i) - (kl[b + i] - kl[i]))) for i in range(b)],
        "tdpo2": [-ls(0.1 * (m(i) - 0.5 * (kl[b + i] - kl[i]))) for i in range(b)],
    }.items():
        got = po.make_loss(parse(po.POConfig, ["--loss", name], "po"))(s).losses
        torch.testing.assert_close(got, torch.stack(want).to(got.dtype), atol=1e-12, rtol=0)
    # T-REG (DPO base, sum reduction): L_DPO + α w (−β Σ r̂ ℓ^θ over both responses), w = σ(Z_l − Z_w)
    got = po.make_loss(parse(po.POConfig, ["--loss", "treg-dpo", "--alpha", "0.3"], "po"))(s)
    for i in range(b):
        zw, zl = 0.1 * (pi[i] - ref[i]), 0.1 * (pi[b + i] - ref[b + i])
        w = torch.sigmoid(torch.tensor(zl - zw, dtype=torch.float64))
        reg = sum(-0.1 * float(r[row, j] * s.token_logps[row, j]) for row in (i, b + i) for j in range(5) if s.mask[row, j])
        want = -ls(zw - zl) + 0.3 * w * reg
        torch.testing.assert_close(got.losses[i], want.to(got.losses.dtype), atol=1e-12, rtol=0)
        torch.testing.assert_close(got.extras["weights"][i], w.to(got.losses.dtype), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------ smoke runs


@pytest.mark.parametrize("loss,extra,keys", [
    ("dpo", [], []),
    ("simpo", [], []),
    ("tdpo1", [], ["kl/chosen", "kl/rejected", "kl/margin"]),
    ("tdpo2", [], ["kl/chosen", "kl/rejected", "kl/margin"]),
    ("treg-dpo", [], ["treg/weight", *po.TREG_DIAGNOSTICS]),  # contrastive rewards with the reference per batch
    ("treg-dpo", ["--contrastive_template", "control"], ["treg/weight", *po.TREG_DIAGNOSTICS]),
    ("treg-simpo", ["--reg_source", "dpo_implicit"], ["treg/weight", *po.TREG_DIAGNOSTICS]),
    ("dpo", ["--rpo_alpha", "1.0"], ["nll_loss"]),  # DPO-SFT
])
def test_every_loss_runs_and_writes_checkpoints_and_the_model(tiny_world, tmp_path, loss, extra, keys):
    cfg = _cfg(tiny_world, tmp_path / "run", "--loss", loss, "--max_steps", "3", "--save_steps", "3",
               "--eval_steps", "2", *extra)
    model, tok, train_data, eval_data = po.load_inputs(cfg)
    run = po.train(cfg, model, tok, train_data, eval_data)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    base = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"]
    for r in rows + _rows(run, "eval"):
        for k in base + keys:
            assert k in r and r[k] == r[k] and abs(r[k]) < 1e6, (k, r)
    assert [r["step"] for r in _rows(run, "eval")] == [2, 3]
    assert (run / "checkpoints" / "step-000003" / "trainer_state.json").is_file()
    assert (run / "final" / "model.safetensors").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["method"] == loss and info["beta"] == cfg.beta


def test_dpo_raises_heldout_pair_accuracy(tiny_world, tmp_path):
    cfg = _cfg(tiny_world, tmp_path / "run", "--max_steps", "40", "--per_device_train_batch_size", "16",
               "--beta", "0.5", "--learning_rate", "3e-4", "--max_eval_samples", "80", "--logging_steps", "10")
    model, tok, train_data, eval_data = po.load_inputs(cfg)
    ref = po_reference.Reference(copy.deepcopy(model).eval())
    before = po.evaluate(model, eval_data, po.make_plan(cfg, eval_data, eval_split=True), po.make_loss(cfg), ref, cfg,
                         _fake_acc())
    run = po.train(cfg, model, tok, train_data, eval_data)
    after = _rows(run, "eval")[-1]
    assert before["rewards/accuracies"] == 0.0  # policy == reference: every implicit reward is 0, a tie
    # chance is 0.5; 40 small steps on the tiny world reach 0.60-0.63 with margins 0.23-0.27 (the world's build, its
    # thread count, moves them); the held-out loss need not fall at β = 0.5 (confident mistakes), the training loss does
    assert after["rewards/accuracies"] > 0.55 and after["rewards/margins"] > 0.1
    train = _rows(run, "train")
    assert train[-1]["loss"] < train[0]["loss"]


# ------------------------------------------------------------------------------------------------ reference paths


def test_lora_reference_is_the_frozen_base(tiny_world, tmp_path):
    """The policy with its adapter disabled gives the base model's reference log-probs (no second copy)."""
    from finegrain.models.build import apply_lora

    cfg = _cfg(tiny_world, tmp_path / "run", "--loss", "tdpo2", "--max_train_samples", "8")
    model, _, data, _ = po.load_inputs(cfg)
    base = copy.deepcopy(model).eval()
    policy = apply_lora(model, 4, 8, 0.0, ["all-linear"]).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a trained-looking adapter, so the policy differs from its base
    batch = data.collate(list(range(8)))
    plan = po.make_plan(cfg, data)
    lora = po.batch_stats(policy, po_reference.Reference(policy=policy, context=policy.disable_adapter), batch, plan, cfg)
    frozen = po.batch_stats(policy, po_reference.Reference(base), batch, plan, cfg)
    torch.testing.assert_close(lora.ref_token_logps, frozen.ref_token_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora.token_kl, frozen.token_kl, atol=1e-5, rtol=1e-5)
    assert (lora.token_kl[batch.completion_mask] > 1e-6).all()  # the adapter does change the policy


def test_lora_run_trains_and_resumes(tiny_world, tmp_path):
    out = tmp_path / "run"
    args = ["--use_peft", "--lora_r", "4", "--save_steps", "2", "--eval_steps", "0"]
    cfg = _cfg(tiny_world, out, *args, "--max_steps", "2")
    po.train(cfg, *po.load_inputs(cfg)[:3])
    cfg = _cfg(tiny_world, out, *args, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    run = po.train(cfg, *po.load_inputs(cfg)[:3])
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]
    assert (run / "final" / "adapter").is_dir()


@pytest.mark.parametrize("loss", ["dpo", "treg-dpo"])
def test_precomputed_reference_gives_the_same_loss_as_live(tiny_world, tmp_path, loss):
    live = _cfg(tiny_world, tmp_path / "live", "--loss", loss, "--max_steps", "3", "--eval_steps", "3")
    pre = _cfg(tiny_world, tmp_path / "pre", "--loss", loss, "--max_steps", "3", "--eval_steps", "3",
               "--precompute_ref_log_probs")
    runs = [po.train(c, *po.load_inputs(c)) for c in (live, pre)]
    for split in ("train", "eval"):
        a, b = (_rows(r, split) for r in runs)
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):
            for k in ("loss", "rewards/margins", "logps/chosen"):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), (split, k)
    assert (runs[1] / "ref_cache" / "train.pt").is_file() and (runs[1] / "ref_cache" / "eval.pt").is_file()


def test_resume_reads_the_reference_cache_and_continues_at_the_right_step(tiny_world, tmp_path, monkeypatch):
    out, full = tmp_path / "run", tmp_path / "full"
    common = ["--save_steps", "2", "--eval_steps", "0", "--precompute_ref_log_probs"]
    ref_cfg = _cfg(tiny_world, full, *common, "--max_steps", "4")
    reference_run = po.train(ref_cfg, *po.load_inputs(ref_cfg))
    first = _cfg(tiny_world, out, *common, "--max_steps", "2")
    po.train(first, *po.load_inputs(first))

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference was run again on resume")

    monkeypatch.setattr(po_reference.Reference, "hidden", no_reference)
    second = _cfg(tiny_world, out, *common, "--max_steps", "4", "--resume_from_checkpoint", "latest")
    run = po.train(second, *po.load_inputs(second))
    rows, want = _rows(run), _rows(reference_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for got, expected in zip(rows[2:], want[2:]):  # steps 3 and 4 continue the uninterrupted run exactly
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert got["samples"] == expected["samples"]
    assert json.loads((run / "run.json").read_text())["steps"] == 4


def test_external_token_rewards_must_exist(tiny_world, tmp_path):
    cfg = _cfg(tiny_world, tmp_path / "run", "--loss", "treg-dpo", "--reg_source", "external", "--max_steps", "1")
    model, tok, train_data, eval_data = po.load_inputs(cfg)
    with pytest.raises(ConfigError, match="finegrain label contrastive"):
        po.train(cfg, model, tok, train_data, eval_data)


def test_token_rewards_from_a_named_column(tiny_world, tmp_path):
    """--token_rewards_column NAME reads chosen_NAME / rejected_NAME, one value per response token (EOS optional)."""
    from finegrain.data.tokenize import tokenize_response
    from finegrain.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_world / "sft"))
    rows = [{"prompt": "describe the river .", "chosen": "it flows gently .", "rejected": "it is dry ."},
            {"prompt": "tell me about the fox .", "chosen": "it runs .", "rejected": "maybe , it sleeps badly ."}]
    for r in rows:
        for side in ("chosen", "rejected"):
            n = len(tokenize_response(tok, r[side])[0]) - 1  # without EOS: EOS then gets 0
            r[f"{side}_tlcr"] = [round(0.1 * (k + 1) * (1 if side == "chosen" else -1), 3) for k in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tiny_world, tmp_path / "run", "--loss", "treg-dpo", "--reg_source", "external",
               "--token_rewards_column", "tlcr", "--dataset_name", str(path))
    _, _, data, _ = po.load_inputs(cfg)
    assert po.make_plan(cfg, data).token_rewards == "column"
    batch = data.collate([0, 1])
    want = torch.tensor(rows[1]["rejected_tlcr"] + [0.0])
    torch.testing.assert_close(batch.extras["token_rewards"][3, : len(want)], want)
    with pytest.raises(ConfigError, match="T-REG option"):
        _cfg(tiny_world, tmp_path / "x", "--token_rewards_column", "tlcr")


# ------------------------------------------------------------------------------------------------ T-REG: issue 15


def test_treg_defaults_and_the_new_options():
    treg = parse(po.POConfig, ["--loss", "treg-dpo"], "po")
    assert treg.alpha == po.TREG_DEFAULT_ALPHA and (treg.reg_source, treg.reg_map) == ("contrastive", None)
    assert parse(po.POConfig, ["--loss", "tdpo2"], "po").alpha == po.DEFAULT_ALPHA == 0.5
    spec = parse(po.POConfig, ["--loss", "treg-simpo", "--reg_source", "implicit:runs/dpo", "--reg_map", "half"], "po")
    assert po.reg_source_is_spec(spec) and po.needs_reference_model(spec)
    assert not po.reg_source_is_spec(treg)
    assert parse(po.POConfig, ["--rpo_alpha", "0.5"], "po").rpo_alpha == 0.5
    bad = {
        "adds an SFT term to DPO": ["--loss", "simpo", "--rpo_alpha", "1"],
        "option 'rpo_alpha' must be >= 0": ["--rpo_alpha", "-1"],
        "maps the rewards of a reward spec": ["--loss", "treg-dpo", "--reg_map", "half"],
        "T-REG option": ["--loss", "dpo", "--reg_source", "implicit:x"],
        "must name a source": ["--loss", "treg-dpo", "--reg_source", " "],
    }
    for message, argv in bad.items():
        with pytest.raises(ConfigError, match=message):
            parse(po.POConfig, argv, "po")


def test_dpo_sft_on_the_batch_layout_by_hand():
    """--rpo_alpha λ: L_DPO + λ · (−Σ_t m_t ℓ^θ_t / |y_w|) on the chosen rows; masked tokens count nowhere."""
    s = _stats(seed=4)
    b = 3
    dirty = po.PreferenceStats(**{**s.__dict__, "token_logps": s.token_logps.masked_fill(~s.mask, float("nan"))})
    cfg = parse(po.POConfig, ["--rpo_alpha", "0.7"], "po")
    got = po.make_loss(cfg)(dirty)
    for i in range(b):
        def seq(x, row):
            return sum(float(x[row, j]) for j in range(x.shape[1]) if s.mask[row, j])

        u = 0.1 * ((seq(s.token_logps, i) - seq(s.ref_token_logps, i))
                   - (seq(s.token_logps, b + i) - seq(s.ref_token_logps, b + i)))
        nll = -seq(s.token_logps, i) / int(s.mask[i].sum())
        want = math.log1p(math.exp(-u)) + 0.7 * nll
        assert float(got.losses[i]) == pytest.approx(want, abs=1e-12)
        assert float(got.extras["nll_loss"][i]) == pytest.approx(nll, abs=1e-12)
    plain = po.make_loss(parse(po.POConfig, ["--rpo_alpha", "0"], "po"))(s).losses
    torch.testing.assert_close(plain, po.make_loss(parse(po.POConfig, [], "po"))(s).losses, atol=0, rtol=0)


def test_shared_token_masks_by_hand():
    """Tokens kept by the alignment of the pair's two responses are shared; masked slots never are."""
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, 7, eos, pad], [8, 9, eos, pad, pad],   # chosen rows
                        [5, 7, eos, pad, pad], [8, 9, eos, pad, pad]])  # rejected rows
    mask = ids != pad
    got = po.shared_token_masks(ids, mask)
    assert got.tolist() == [[True, False, True, True, False], [True, True, True, False, False],
                            [True, True, True, False, False], [True, True, True, False, False]]


def test_treg_diagnostic_is_the_token_mean_over_shared_and_differing_tokens():
    """treg/shared_reward = Σ r̂ over shared tokens / their number, pooled over the pairs (not a mean of per-pair
    means); the same for |r̂| and for the differing tokens; treg/shared_share = shared / all tokens."""
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, eos, pad], [8, 9, 4, eos], [5, 7, eos, pad], [3, eos, pad, pad]])
    mask = ids != pad
    rewards = torch.tensor([[0.25, 0.5, 0.0, 9.0], [0.125, -0.25, 0.375, 0.0],
                            [-0.25, -0.5, 0.0, 9.0], [0.5, 0.0, 9.0, 9.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    stats = po.PreferenceStats(token_logps=-torch.rand(4, 4, generator=g, dtype=torch.float64), mask=mask,
                               ref_token_logps=-torch.rand(4, 4, generator=g, dtype=torch.float64),
                               token_rewards=rewards, shared=po.shared_token_masks(ids, mask))
    # pair 0: shared 5, EOS on both sides (r̂ 0.25, 0, −0.25, 0), differing 6 / 7 (0.5, −0.5)
    # pair 1: shared EOS on both (0, 0); differing 8 9 4 / 3 (0.125, −0.25, 0.375, 0.5)
    cfg = parse(po.POConfig, ["--loss", "treg-dpo"], "po")
    total = {}
    po.accumulate(total, po.pair_metrics(po.make_loss(cfg)(stats), stats))
    got = po.reduce_metrics(total, 2, _fake_acc(), po.metric_names(cfg))
    shared, diff = [0.25, 0.0, -0.25, 0.0, 0.0, 0.0], [0.5, -0.5, 0.125, -0.25, 0.375, 0.5]
    assert got["treg/shared_reward"] == pytest.approx(sum(shared) / 6)
    assert got["treg/shared_abs_reward"] == pytest.approx(sum(map(abs, shared)) / 6)
    assert got["treg/diff_reward"] == pytest.approx(sum(diff) / 6)
    assert got["treg/diff_abs_reward"] == pytest.approx(sum(map(abs, diff)) / 6)
    assert got["treg/shared_share"] == pytest.approx(6 / 12)
    assert not any(k.startswith("sum/") for k in got)


def test_token_rewards_from_a_dpo_trained_policy(tiny_world, tmp_path):
    """--reg_source implicit:RUN (the paper's ablation): the DPO run's token rewards β ρ_t, squashed by σ(x) − ½,
    computed once into the data's columns (cached in the run directory) before training."""
    from finegrain.models.loading import load_causal_lm
    from finegrain.rewards.contrastive import squash_to_half
    from finegrain.rewards.implicit import ImplicitRewardSource

    dpo_cfg = _cfg(tiny_world, tmp_path / "dpo", "--max_steps", "3", "--eval_steps", "0", "--learning_rate", "3e-3")
    dpo_run = po.train(dpo_cfg, *po.load_inputs(dpo_cfg))
    cfg = _cfg(tiny_world, tmp_path / "treg", "--loss", "treg-dpo", "--reg_source", f"implicit:{dpo_run / 'final'}",
               "--max_steps", "2", "--eval_steps", "2", "--max_train_samples", "24")
    model, tok, train_data, eval_data = po.load_inputs(cfg)
    assert po.make_plan(cfg, train_data).token_rewards == "source"
    run = po.train(cfg, model, tok, train_data, eval_data)
    assert (run / "ref_cache" / "train_token_rewards.pt").is_file()
    assert (run / "ref_cache" / "eval_token_rewards.pt").is_file()
    for r in _rows(run) + _rows(run, "eval"):
        assert all(k in r for k in po.TREG_DIAGNOSTICS)
    batch = train_data.collate([0, 1, 2])
    policy, sft = load_causal_lm(str(dpo_run / "final")).eval(), load_causal_lm(str(tiny_world / "sft")).eval()
    want = squash_to_half(ImplicitRewardSource(policy, 0.1, ref_model=sft).token_rewards(batch).values)
    torch.testing.assert_close(batch.extras["token_rewards"], want.float(), atol=1e-5, rtol=0)
    assert batch.extras["token_rewards"].abs().max() > 0
