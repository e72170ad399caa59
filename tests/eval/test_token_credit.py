"""Token-credit evaluation: ground truth on tokens (word credit through offsets, token labels, edit labels), sources
(oracle credit, hand-made, implicit, contrastive) against hand-derived or naive values, token_credit.json in the
report."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finegrain.cli.commands import eval_command as main
from finegrain.errors import ConfigError, DataError
from finegrain.eval.token_credit import (
    evaluate_token_credit_sources,
    load_credit_examples,
    word_credit_to_tokens,
)
from finegrain.models.loading import load_causal_lm, load_tokenizer
from finegrain.types import TokenRewards
from finegrain.world.app import credit_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _tiny_tokenizers import bpe_tokenizer, word_tokenizer  # noqa: E402

WORD = word_tokenizer()


class TableSource:
    """A hand-made source: a fixed reward per token id (0 for ids not in the table)."""

    name = "table"

    def __init__(self, tokenizer, table):
        self.table = {tokenizer.convert_tokens_to_ids(t): v for t, v in table.items()}

    def token_rewards(self, batch):
        ids, mask = batch.completion_input_ids, batch.completion_mask.bool()
        values = torch.tensor([[self.table.get(int(i), 0.0) for i in row] for row in ids])
        return TokenRewards(values=torch.where(mask, values, torch.zeros(())), mask=mask)


HAND_ROWS = [
    {"prompt": "what color is the sky ?", "response": "a b c", "words": ["a", "b", "c"], "credit": [1.0, -1.0, 0.0]},
    {"prompt": "the dog", "response": "d cat", "words": ["d", "cat"], "credit": [-0.5, 2.0]},
]
# Rewards by token; c (credit 0) and EOS (no credit) are neutral, so their large values must not matter.
HAND_TABLE = {"a": 0.9, "b": 0.1, "c": 5.0, "d": 0.5, "cat": 0.3, "[EOS]": 7.0}


def test_word_credit_reaches_every_bpe_piece_of_its_word():
    """Byte-level BPE splits 'colour' into ' colo', 'u', 'r' and 'skyline' into ' sky', 'l', 'i', 'n', 'e'; each
    piece takes its word's credit (the leading space of ' colo' overlaps no word, the other 4 characters overlap
    'colour'); the EOS overlaps no word and is neutral."""
    tok = bpe_tokenizer()
    text = "what colour is the skyline? naïve"
    words = ["what", "colour", "is", "the", "skyline", "?", "naïve"]
    examples = load_credit_examples(
        [{"prompt": "q", "response": text, "words": words, "credit": [0.0, 1.0, 0.0, 0.0, -1.0, 0.0, 0.5]}], tok)
    (ex,) = examples
    pieces = [text[s:e] for s, e in ex.offsets]
    assert pieces == ["what", " colo", "u", "r", " is", " the", " sky", "l", "i", "n", "e", "?", " naïve", ""]
    assert ex.truth == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0, 0.0, 0.5, 0.0]
    assert ex.input_ids[-1] == tok.eos_token_id


def test_word_credit_errors_name_the_row_and_field():
    with pytest.raises(DataError, match="row 1.*'words'.*not in the response"):
        word_credit_to_tokens("a b", ["a", "x"], [0.0, 1.0], [(0, 1), (2, 3)], source="f.jsonl", row=0)
    with pytest.raises(DataError, match="2 words but 1 credit"):
        word_credit_to_tokens("a b", ["a", "b"], [0.0], [(0, 1), (2, 3)])
    with pytest.raises(DataError, match="finite"):
        word_credit_to_tokens("a b", ["a", "b"], [0.0, math.nan], [(0, 1), (2, 3)])
    bad = [dict(HAND_ROWS[0]), {**HAND_ROWS[1], "words": ["d", "dog"]}]
    with pytest.raises(DataError, match="row 2.*'words'"):
        load_credit_examples(bad, WORD)
    with pytest.raises(DataError, match="cannot tell the ground truth"):
        load_credit_examples([{"prompt": "a", "response": "b"}], WORD)


def test_hand_made_source_gives_the_hand_computed_auroc(tmp_path):
    """Positives (credit > 0): a (0.9), cat (0.3); negatives (credit < 0): b (0.1), d (0.5); c and EOS are neutral.
    Positive-negative pairs ranked right: (a, b), (a, d), (cat, b), but not (cat, d): AUROC = 3/4.
    k = 2 positives; the two highest non-neutral scores are a and d, one positive: precision@2 = 1/2.
    The oracle-credit source is the truth itself: AUROC 1, precision 1."""
    res = evaluate_token_credit_sources({"table": TableSource(WORD, HAND_TABLE), "truth copy": "oracle-credit"},
                                        data=HAND_ROWS, tokenizer=WORD, output_dir=tmp_path, quiet=True)
    assert res["auroc"] == {"table": 0.75, "truth copy": 1.0}
    assert res["precision_at_k"] == {"table": 0.5, "truth copy": 1.0}
    assert res["k"] == {"table": 2, "truth copy": 2}
    assert (res["n_pos"], res["n_neg"], res["n_neutral"], res["num_responses"]) == (2, 2, 3, 2)
    first = res["examples"][0]
    assert first["tokens"] == ["a", "b", "c", "[EOS]"]
    assert first["sources"]["truth"] == first["sources"]["truth copy"] == [1.0, -1.0, 0.0, 0.0]
    assert first["sources"]["table"] == pytest.approx([0.9, 0.1, 5.0, 7.0])
    assert json.loads((tmp_path / "token_credit.json").read_text()) == res


def test_token_labels_and_edit_labels_as_ground_truth():
    """Token rows carry labels per token (EOS unlabelled -> neutral); revision rows are labelled by edit alignment:
    'cat' -> 'dog' makes the rejected 'cat' -1 and the revised 'dog' +1, everything else neutral."""
    token_rows = [{"prompt": "q", "response": "the cat sat", "labels": [1, 0, -1]}]
    (ex,) = load_credit_examples(token_rows, WORD)
    assert ex.truth == [1.0, 0.0, -1.0, 0.0]
    revision_rows = [{"prompt": "q", "rejected": "the cat sat", "revised": "the dog sat"}]
    rejected, revised = load_credit_examples(revision_rows, WORD)
    assert (rejected.text, rejected.truth) == ("the cat sat", [0.0, -1.0, 0.0, 0.0])
    assert (revised.text, revised.truth) == ("the dog sat", [0.0, 1.0, 0.0, 0.0])
    res = evaluate_token_credit_sources(["oracle-credit"], data=revision_rows, tokenizer=WORD, quiet=True)
    assert res["auroc"]["oracle-credit"] == 1.0 and (res["n_pos"], res["n_neg"]) == (1, 1)


def test_token_credit_json_renders_as_heatmaps_in_the_report(tmp_path):
    from finegrain.report import build_report

    rows = HAND_ROWS + [{"prompt": "<b>&", "response": "the <cat>", "words": ["the", "<cat>"], "credit": [0.0, 1.0]}]
    res = evaluate_token_credit_sources({"table": TableSource(WORD, HAND_TABLE)}, data=rows, tokenizer=WORD,
                                        output_dir=tmp_path / "run", quiet=True)
    page = build_report([tmp_path / "run"], tmp_path / "report.html").read_text()
    assert page.count('<div class="heatmap">') == 3
    assert 'data-source="truth"' in page and 'data-source="table"' in page
    assert 'id="token-credit-table"' in page and f"<td>{res['auroc']['table']:.3g}</td>" in page
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page  # the prompt
    assert ">&lt;</span>" in page and ">&gt;</span>" in page  # the tokens '<' and '>' of '<cat>'


# ---------------------------------------------------------------------------------------------- world sources


@pytest.fixture(scope="module")
def dpo_run(tiny_world, tmp_path_factory):
    """A run directory whose final/ is the SFT model with small noise on every weight, trained with beta 0.1."""
    run = tmp_path_factory.mktemp("dpo_run")
    model = load_causal_lm(str(tiny_world / "sft"))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(run / "final")
    load_tokenizer(str(tiny_world / "sft")).save_pretrained(run / "final")
    (run / "config.yaml").write_text("beta: 0.1\n")
    (run / "run.json").write_text(json.dumps({"command": "po", "method": "dpo", "status": "completed"}))
    return run


def _response_logps(model, prompt_ids, response_ids):
    x = torch.tensor([prompt_ids + response_ids])
    logps = F.log_softmax(model(x).logits[0, len(prompt_ids) - 1 : -1].double(), dim=-1)
    return logps.gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def test_oracle_credit_on_the_world_is_perfect(tiny_world):
    from finegrain.world.oracle import judge

    res = evaluate_token_credit_sources(["oracle-credit", "oracle_credit"], **credit_settings(tiny_world), max_rows=40,
                                        quiet=True)
    # oracle_credit is the reward-source registry's oracle (credit on the token that ends each word): the same here.
    assert res["auroc"] == {"oracle-credit": 1.0, "oracle_credit": 1.0}
    assert res["precision_at_k"] == {"oracle-credit": 1.0, "oracle_credit": 1.0}
    assert res["n_pos"] > 0 and res["n_neg"] > 0 and res["num_responses"] == 40
    for ex in res["examples"]:  # world tokenizer: token i is word i, then the EOS
        j = judge(ex["prompt"], " ".join(ex["tokens"][:-1]))
        assert ex["tokens"][:-1] == j.words and ex["sources"]["truth"] == j.credit + [0.0]


def test_implicit_rewards_match_a_naive_forward(tiny_world, dpo_run):
    """implicit:RUN/final gives beta (log pi(y_t) - log pi_ref(y_t)) per token with beta from RUN/config.yaml and
    the name from RUN/run.json."""
    res = evaluate_token_credit_sources([f"implicit:{dpo_run / 'final'}"], **credit_settings(tiny_world), max_rows=6,
                                        num_examples=3, quiet=True)
    assert list(res["auroc"]) == ["implicit_dpo"]
    policy, ref = load_causal_lm(str(dpo_run / "final")), load_causal_lm(str(tiny_world / "sft"))
    tok = load_tokenizer(str(tiny_world / "sft"))
    from finegrain.data.tokenize import tokenize_prompt

    for ex in res["examples"]:
        prompt = tokenize_prompt(tok, ex["prompt"])
        ids = tok.convert_tokens_to_ids(ex["tokens"])
        expected = 0.1 * (_response_logps(policy, prompt, ids) - _response_logps(ref, prompt, ids))
        assert ex["sources"]["implicit_dpo"] == pytest.approx(expected.tolist(), abs=1e-5)


def test_implicit_rewards_of_the_reference_itself_are_zero(tiny_world):
    """Policy = reference: every implicit reward is exactly 0, all tokens tie, AUROC 1/2."""
    res = evaluate_token_credit_sources([f"self=implicit:{tiny_world / 'sft'}"], **credit_settings(tiny_world), max_rows=10,
                                        quiet=True)
    assert res["auroc"] == {"self": 0.5}
    assert all(v == 0.0 for ex in res["examples"] for v in ex["sources"]["self"])


def test_contrastive_rewards_match_a_naive_forward(tiny_world):
    """contrastive: sigma(log pi_ref(y_t | P+) - log pi_ref(y_t | P-)) - 1/2 with the world's control prompts."""
    from finegrain.data.tokenize import tokenize_prompt
    from finegrain.world.app import world_contrastive_template
    from finegrain.world.corpus import control_prompts

    res = evaluate_token_credit_sources(["contrastive"], **credit_settings(
        tiny_world, contrastive_template=world_contrastive_template("control")), max_rows=6, num_examples=3, quiet=True)
    ref, tok = load_causal_lm(str(tiny_world / "sft")), load_tokenizer(str(tiny_world / "sft"))
    for ex in res["examples"]:
        plus, minus = control_prompts(ex["prompt"])
        ids = tok.convert_tokens_to_ids(ex["tokens"])
        diff = (_response_logps(ref, tokenize_prompt(tok, plus), ids)
                - _response_logps(ref, tokenize_prompt(tok, minus), ids))
        assert ex["sources"]["contrastive"] == pytest.approx((torch.sigmoid(diff) - 0.5).tolist(), abs=1e-5)
    assert 0.0 <= res["auroc"]["contrastive"] <= 1.0


def test_source_spec_errors(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="unknown kind 'no-such-source'"):
        evaluate_token_credit_sources(["no-such-source"], **credit_settings(tiny_world), max_rows=2, quiet=True)
    with pytest.raises(ConfigError, match="needs a policy"):
        evaluate_token_credit_sources(["implicit"], **credit_settings(tiny_world), max_rows=2, quiet=True)
    with pytest.raises(ConfigError, match="reference"):
        evaluate_token_credit_sources(["contrastive"], data=HAND_ROWS, tokenizer=WORD, quiet=True)
    (tmp_path / "rm").mkdir()
    with pytest.raises(ConfigError, match="no finegrain_reward.json"):
        evaluate_token_credit_sources([str(tmp_path / "rm")], **credit_settings(tiny_world), max_rows=2, quiet=True)


def test_command_line_token_credit_only(tiny_world, tmp_path, capsys):
    out = tmp_path / "credit"
    code = main(["--token_credit", "oracle-credit", f"zero=implicit:{tiny_world / 'sft'}", "--world_dir",
                 str(tiny_world), "--max_credit_rows", "8", "--num_credit_examples", "2", "--output_dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "oracle-credit" in printed and "zero" in printed
    data = json.loads((out / "token_credit.json").read_text())
    assert data["auroc"] == {"oracle-credit": 1.0, "zero": 0.5} and len(data["examples"]) == 2
    assert not (out / "eval.json").exists()


def test_a_sentence_reward_model_is_judged_with_its_terms_spread_over_each_sentence(tiny_world, tmp_path):
    """A sentence RM's source puts each term on the sentence's last token (for PPO); the credit evaluation spreads it
    over the sentence, so every word of a sentence gets the same non-zero value."""
    from finegrain.models.reward_model import build_reward_model, save_reward_model

    tok = load_tokenizer(str(tiny_world / "sft"))
    model = build_reward_model("sentence", load_causal_lm(str(tiny_world / "sft")), tok, seed=0, embed_dim=16)
    save_reward_model(model, tmp_path / "srm")
    res = evaluate_token_credit_sources([f"srm={tmp_path / 'srm'}"], **credit_settings(tiny_world), max_rows=8, quiet=True)
    checked = 0
    for ex in res["examples"]:
        words, values = ex["tokens"][:-1], ex["sources"]["srm"][:-1]
        start = 0
        for end, w in enumerate(words):
            if w == "." and end > start:
                sentence = values[start : end + 1]
                assert all(v == pytest.approx(sentence[0], abs=1e-6) for v in sentence) and sentence[0] != 0.0
                checked += 1
                start = end + 1
    assert checked > 0
