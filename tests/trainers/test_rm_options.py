"""finegrain rm options of issue 15: revision rows without edits (kept toward (½, ½) for the discriminator, the old
drop as an option), the token RM's edit weight (0: plain Bradley-Terry on summed token rewards, on revision rows or
on pairs), the sequence RM's bias-free score head, and word-level credit that leaves the EOS token out -- each against
a naive computation on the tiny world's model."""

import json
import math

import pytest
import torch

from finegrain.cli.commands import command_config
from finegrain.config import parse
from finegrain.errors import ConfigError, DataError
from finegrain.losses.bt import bradley_terry_loss
from finegrain.trainers.rm import RMConfig, load_inputs, pair_losses, revision_forward, train
from finegrain.trainers.rm_data import revision_examples, score_credit

pytestmark = pytest.mark.smoke


def _cfg(tiny_world, tmp_path, level, *extra):
    args = ["--level", level, "--world_dir", str(tiny_world), "--output_dir", str(tmp_path / level),
            "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--logging_steps", "1",
            "--max_eval_samples", "16", "--max_credit_samples", "16", "--disable_tqdm", "--seed", "1",
            "--lr_scheduler_type", "constant", *extra]
    return command_config("rm", RMConfig, args)


def _revisions_with_no_edit(tiny_world, tmp_path, n=6):
    rows = [json.loads(line) for line in (tiny_world / "data" / "revisions.jsonl").read_text().splitlines()][:n]
    rows[0]["revised"] = rows[0]["rejected"]  # a revision that changed nothing
    rows[1]["revised"] = rows[1]["rejected"].replace(" ", "  ", 1)  # only spacing: the word alignment finds no edit
    path = tmp_path / "revisions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_no_edit_pairs_are_kept_neutral_for_the_discriminator_and_dropped_when_asked(tiny_world, tmp_path):
    path, rows = _revisions_with_no_edit(tiny_world, tmp_path)
    from finegrain.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_world / "sft"))
    for level, option, kept in (("discriminator", "auto", True), ("discriminator", "drop", False),
                                ("token", "auto", False), ("token", "keep", True)):
        cfg = parse(RMConfig, ["--level", level, "--no_edit_pairs", option], "finegrain rm")
        assert cfg.keeps_no_edit_pairs is kept
        ex = revision_examples(str(path), tok, cfg, split=None, limit=None, skip=not kept)
        assert len(ex) == (6 if kept else 4)
        if not kept:  # as before: an identical revision is an invalid row unless skipped
            with pytest.raises(DataError, match="identical"):
                revision_examples(str(path), tok, cfg, split=None, limit=None, skip=False)
        if kept:  # every text token neutral, EOS unlabelled
            for e in ex[:2]:
                assert set(e["rejected_labels"][:-1]) == {0} and e["rejected_labels"][-1] == -100
                assert e["revised_labels"] == e["rejected_labels"]
            assert any(v != 0 for e in ex[2:] for v in e["rejected_labels"][:-1])


def test_a_kept_no_edit_pair_trains_the_discriminator_toward_one_half(tiny_world, tmp_path):
    """Its loss is L_pos + L_neg with both sides the same response and every token's target (½, ½):
    2 · mean_t −½(log p_0 + log p_1) over the response's text tokens (naive, from the logits)."""
    path, _ = _revisions_with_no_edit(tiny_world, tmp_path)
    cfg = _cfg(tiny_world, tmp_path, "discriminator", "--model_name_or_path", str(tiny_world / "sft"),
               "--dataset_name", str(path), "--max_steps", "1")
    data = load_inputs(cfg)
    model = data.model.eval()
    ex = data.train[0]
    losses, _ = revision_forward(model, cfg, [ex], data.tokenizer.pad_token_id, "cpu")
    from finegrain.data.collate import collate_completions

    batch = collate_completions([{"prompt_input_ids": ex["prompt_input_ids"],
                                  "completion_input_ids": ex["rejected_input_ids"]}], data.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = torch.log_softmax(model(batch).double(), -1)[0]
    n = len(ex["rejected_input_ids"]) - 1  # EOS carries no label
    want = 2 * sum(-0.5 * (logp[t, 0] + logp[t, 1]).item() for t in range(n)) / n
    assert losses.item() == pytest.approx(want, abs=1e-5)
    assert losses.item() >= 2 * math.log(2) - 1e-6  # (½, ½) cross-entropy is at least log 2 per side


def test_edit_weight_zero_is_plain_bt_on_summed_token_rewards_on_revisions_and_on_pairs(tiny_world, tmp_path):
    # on revision rows: the sequence term only, S(chosen) against S(rejected)
    cfg = _cfg(tiny_world, tmp_path, "token", "--edit_weight", "0", "--max_steps", "1")
    data = load_inputs(cfg)
    assert data.kind == "revisions"
    model = data.model.eval()
    part = [ex for ex in data.train if ex.get("chosen_input_ids")][:4]
    losses, _ = revision_forward(model, cfg, part, data.tokenizer.pad_token_id, "cpu")
    from finegrain.data.collate import collate_completions

    def S(ex, side):
        b = collate_completions([{"prompt_input_ids": ex["prompt_input_ids"],
                                  "completion_input_ids": ex[f"{side}_input_ids"]}], data.tokenizer.pad_token_id)
        with torch.no_grad():
            return model.token_values(b).double().sum()

    want = bradley_terry_loss(torch.stack([S(e, "chosen") for e in part]), torch.stack([S(e, "rejected") for e in part]))
    torch.testing.assert_close(losses.double(), want.losses, atol=1e-5, rtol=1e-5)

    # on preference pairs: the same loss through pair_losses, and a short run trains and saves
    pairs = str(tiny_world / "data" / "pairs_train.jsonl")
    cfg = _cfg(tiny_world, tmp_path / "p", "token", "--edit_weight", "0", "--model_name_or_path",
               str(tiny_world / "sft"), "--dataset_name", pairs, "--eval_dataset_name",
               str(tiny_world / "data" / "pairs_test.jsonl"), "--max_steps", "6")
    data = load_inputs(cfg)
    assert data.kind == "pairs"
    model = data.model.eval()
    losses, stats = pair_losses(model, cfg, data.train[:3], data.tokenizer.pad_token_id, "cpu")
    want = bradley_terry_loss(torch.stack([S(e, "chosen") for e in data.train[:3]]),
                              torch.stack([S(e, "rejected") for e in data.train[:3]]))
    torch.testing.assert_close(losses.double(), want.losses, atol=1e-5, rtol=1e-5)
    model.train()
    run = train(cfg, data)
    assert (run / "final" / "finegrain_reward.json").is_file()
    # with the edit term on, pairs are refused as before
    bad = _cfg(tiny_world, tmp_path / "q", "token", "--model_name_or_path", str(tiny_world / "sft"),
               "--dataset_name", pairs, "--max_steps", "1")
    with pytest.raises(ConfigError, match="edit_weight 0"):
        load_inputs(bad)


def test_option_errors():
    with pytest.raises(ConfigError, match="without a loss"):
        parse(RMConfig, ["--level", "token", "--edit_weight", "0", "--seq_weight", "0"], "finegrain rm")
    with pytest.raises(ConfigError, match="edit_weight"):
        parse(RMConfig, ["--level", "token", "--edit_weight", "-1"], "finegrain rm")
    with pytest.raises(ConfigError, match="no_edit_pairs"):
        parse(RMConfig, ["--no_edit_pairs", "sometimes"], "finegrain rm")


def test_sequence_rm_head_is_bias_free_by_default_and_score_bias_restores_it(tiny_world, tmp_path):
    for extra, has_bias in (((), False), (("--score_bias",), True)):
        cfg = _cfg(tiny_world, tmp_path / str(has_bias), "sequence", "--max_steps", "2", *extra)
        data = load_inputs(cfg)
        assert (data.model.head.proj.bias is not None) is has_bias
        run = train(cfg, data)
        info = json.loads((run / "final" / "finegrain_reward.json").read_text())
        assert info["head"]["bias"] is has_bias


def test_word_credit_leaves_the_eos_token_out():
    """A source that puts 1 on the text tokens and 100 on EOS: with the EOS left out, each word gets exactly 1
    (mean) or its token count (sum), whatever EOS carries."""
    from finegrain.types import TokenRewards

    class Fixed:
        def token_rewards(self, batch):
            v = batch.completion_mask.float()
            last = batch.completion_mask.sum(1) - 1
            v[torch.arange(v.shape[0]), last] = 100.0
            return TokenRewards(values=v, mask=batch.completion_mask.bool())

    item = {"prompt_input_ids": [5, 6], "completion_input_ids": [7, 8, 9, 2], "offsets": [(0, 2), (2, 5), (6, 8),
                                                                                         (8, 8)],
            "credit": [1.0, -1.0], "spans": [(0, 5), (6, 8)]}
    scores, credit = score_credit(Fixed(), [item], 0, reduce="mean")
    assert scores[0].tolist() == [1.0, 1.0] and credit[0].tolist() == [1.0, -1.0]
    scores, _ = score_credit(Fixed(), [item], 0, reduce="sum")
    assert scores[0].tolist() == [2.0, 1.0]
