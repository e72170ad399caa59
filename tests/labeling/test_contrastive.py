"""``finegrain label contrastive`` and the contrastive reward source, against plain forwards on unpadded inputs."""

import json

import pytest
import torch

from finegrain.cli.commands import command_config
from finegrain.data.prepared import PreferenceData
from finegrain.data.tokenize import tokenize_prompt, tokenize_response
from finegrain.errors import ConfigError
from finegrain.labeling.contrastive import ContrastiveLabelConfig, run_contrastive
from finegrain.models.loading import load_causal_lm, load_tokenizer
from finegrain.rewards.contrastive import ContrastiveRewardSource, ContrastiveTemplate
from finegrain.world.app import world_contrastive_template, world_control_template
from finegrain.world.corpus import REVISION_REQUEST, control_prompts, revision_prompts


def _on_world(world, *args):
    """``finegrain label contrastive --world_dir WORLD ARGS`` as its parsed config (the world fills model and data)."""
    return command_config("label contrastive", ContrastiveLabelConfig, ["--world_dir", str(world), *map(str, args)])


@pytest.fixture(scope="module")
def scorer(tiny_world):
    return load_causal_lm(str(tiny_world / "sft")).eval(), load_tokenizer(str(tiny_world / "sft"))


def _naive_rewards(model, tokenizer, template, prompt, response_text, response_ids):
    """σ(log p(y_t | P+, y_<t) − log p(y_t | P−, y_<t)) − ½ from two plain forwards of [template ids + response ids]."""
    out = []
    for ids in template.token_ids(tokenizer, prompt, response_text):
        x = torch.tensor([ids + response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
        p = len(ids)
        out.append(torch.stack([logp[p - 1 + t, y] for t, y in enumerate(response_ids)]))
    return torch.sigmoid(out[0] - out[1]) - 0.5


@pytest.mark.parametrize("form", ["control", "system", "draft", "world-draft"])
def test_rewards_equal_a_naive_per_token_computation(scorer, tiny_world, form):
    model, tok = scorer
    data = PreferenceData.from_source(str(tiny_world / "data" / "pairs_test.jsonl"), tok, skip_invalid=True,
                                      max_examples=6)
    template = world_contrastive_template() if form == "world-draft" else ContrastiveTemplate(form)
    batch = data.collate(list(range(len(data))))
    b = len(data)
    assert batch.prompts == [ex["prompt"] for ex in data] * 2  # the batch carries the raw prompts and texts
    assert batch.responses == [ex["chosen_text"] for ex in data] + [ex["rejected_text"] for ex in data]
    got = ContrastiveRewardSource(model, tok, template, chunk_size=7).token_rewards(batch)
    assert torch.equal(got.mask, batch.completion_mask)
    for row in range(2 * b):
        ex, side = data[row % b], ("chosen", "rejected")[row // b]
        ids = ex[f"{side}_input_ids"]
        want = _naive_rewards(model, tok, template, ex["prompt"], ex[f"{side}_text"], ids)
        torch.testing.assert_close(got.values[row, : len(ids)].double(), want, atol=2e-5, rtol=0)
        assert (got.values[row, len(ids):] == 0).all()
    assert (got.values.abs() < 0.5).all()


def test_templates(scorer):
    _, tok = scorer
    prompt = "describe the river ."
    control = world_contrastive_template("control")
    assert control.wrap(prompt) == control_prompts(prompt)
    plus, minus = control.token_ids(tok, prompt)
    assert plus == tokenize_prompt(tok, control_prompts(prompt)[0]) and plus != minus
    # a placeholder anywhere in the instruction (not only a prefix), on a plain and on a conversational prompt
    inside = ContrastiveTemplate("control", "how do I make {prompt} well", "how do I make {prompt} badly")
    assert inside.wrap("bread") == ("how do I make bread well", "how do I make bread badly")
    chat, _ = inside.wrap([{"role": "system", "content": "s"}, {"role": "user", "content": "bread"}])
    assert chat == [{"role": "system", "content": "s"}, {"role": "user", "content": "how do I make bread well"}]
    assert ContrastiveTemplate("control", "good:", "bad:").wrap("x") == ("good: x", "bad: x")  # no placeholder: a prefix
    system, _ = ContrastiveTemplate("system", "be good", "be bad").wrap([{"role": "user", "content": prompt}])
    assert system[0] == {"role": "system", "content": "be good"}
    draft, _ = ContrastiveTemplate("draft").wrap(prompt, "it flows .")
    assert "Draft: it flows ." in draft[0]["content"] and prompt in draft[0]["content"]
    with pytest.raises(ValueError, match="needs the response"):
        ContrastiveTemplate("draft").wrap(prompt)
    with pytest.raises(ValueError, match="differ"):
        ContrastiveTemplate("control", "same", "same")


def test_draft_form_with_a_whole_request_in_the_users_words(scorer):
    """The draft form with {prompt} and {draft} placeholders: the request is the user's text, placed as a control
    instruction is (plain text for a plain prompt, the last user turn of a conversation)."""
    _, tok = scorer
    t = ContrastiveTemplate("draft", "improve : {prompt} draft : {draft}", "worsen : {prompt} draft : {draft}")
    assert t.full_request and not t.needs_chat_template
    assert t.wrap("describe the river .", "it flows .") == ("improve : describe the river . draft : it flows .",
                                                            "worsen : describe the river . draft : it flows .")
    # one pass: a prompt or draft holding a placeholder's text is not substituted again
    assert t.wrap("{draft}", "{prompt}")[0] == "improve : {draft} draft : {prompt}"
    chat, _ = t.wrap([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "a")
    assert chat == [{"role": "system", "content": "s"}, {"role": "user", "content": "improve : q draft : a"}]
    assert t.wrap([{"role": "system", "content": "s"}], "a")[0][0] == {"role": "user", "content": "improve :  draft : a"}
    with pytest.raises(ValueError, match="needs the response"):
        t.wrap("q")
    with pytest.raises(ValueError, match="both texts are whole requests"):
        ContrastiveTemplate("draft", "improve : {draft}", "a worse answer")
    # the built-in request: the texts are goals, rendered through the chat template
    builtin = ContrastiveTemplate("draft")
    assert not builtin.full_request and builtin.needs_chat_template
    assert ContrastiveTemplate("system").needs_chat_template and not ContrastiveTemplate("control").needs_chat_template
    # the world's default: the revision requests its SFT model was trained on, token for token
    world = world_contrastive_template()
    assert (world.form, world.positive, world.negative) == ("draft", REVISION_REQUEST["good"], REVISION_REQUEST["bad"])
    assert repr(world_control_template()) == repr(world)  # the older name gives the default
    assert world.wrap("describe the river .", "it flows .") == revision_prompts("describe the river .", "it flows .")
    plus, minus = world.token_ids(tok, "describe the river .", "it flows .")
    assert tok.unk_token_id not in plus + minus and plus != minus
    assert plus == tokenize_prompt(tok, "please improve : describe the river . draft : it flows .")
    with pytest.raises(ValueError, match="contrastive forms"):
        world_contrastive_template("system")


def test_label_command_writes_columns_that_load_and_align(scorer, tiny_world, tmp_path):
    model, tok = scorer
    out = tmp_path / "pairs.contrastive.jsonl"
    cfg = _on_world(tiny_world, "--dataset_name", tiny_world / "data" / "pairs_test.jsonl", "--output_file", out,
                    "--max_samples", 12, "--skip_invalid_rows", "--batch_size", 5)
    run_contrastive(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all("chosen_score" in r for r in rows)  # input columns are kept
    for r in rows:
        for side in ("chosen", "rejected"):
            ids = tokenize_response(tok, r[side])[0]
            assert len(r[f"{side}_token_rewards"]) == len(ids)  # one reward per response token, EOS included
    data = PreferenceData.from_source(str(out), tok)
    batch = data.collate([0, 1])
    assert torch.allclose(batch.extras["token_rewards"][0, : len(rows[0]["chosen_token_rewards"])],
                          torch.tensor(rows[0]["chosen_token_rewards"]))
    # the stored values are the reward source's, pair by pair
    src = ContrastiveRewardSource(model, tok, world_contrastive_template())  # the world's default: revision form
    want = src.token_rewards(batch).values  # prompts decoded from the batch: exact for the world's plain prompts
    torch.testing.assert_close(batch.extras["token_rewards"], want * batch.completion_mask, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="overwrite"):
        run_contrastive(cfg)


def test_cut_responses_get_zero_rewards_on_the_cut_tokens(tiny_world, tmp_path):
    out = tmp_path / "cut.jsonl"
    run_contrastive(_on_world(tiny_world, "--output_file", out, "--max_samples", 8, "--skip_invalid_rows",
                              "--max_length", 12, "--max_prompt_length", 8))
    tok = load_tokenizer(str(tiny_world / "sft"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cut = 0
    for r in rows:
        keep = 12 - len(tokenize_prompt(tok, r["prompt"]))
        for side in ("chosen", "rejected"):
            values = r[f"{side}_token_rewards"]
            assert len(values) == len(tokenize_response(tok, r[side])[0])
            if len(values) > keep:
                cut += 1
                assert all(v == 0 for v in values[keep:]) and any(v != 0 for v in values[:keep])
    assert cut > 0
    PreferenceData.from_source(str(out), tok)  # still loads: the lists have the full length


@pytest.mark.smoke
def test_po_trains_on_the_labelled_file(tiny_world, tmp_path):
    from finegrain.trainers import po

    out = tmp_path / "labelled.jsonl"
    run_contrastive(_on_world(tiny_world, "--output_file", out, "--max_samples", 16, "--skip_invalid_rows"))
    cfg = command_config("po", po.POConfig, ["--world_dir", str(tiny_world), "--dataset_name", str(out), "--loss",
                                             "treg-dpo", "--reg_source", "external", "--max_steps", "2",
                                             "--per_device_train_batch_size", "4", "--max_eval_samples", "8",
                                             "--output_dir", str(tmp_path / "run"), "--disable_tqdm"])
    model, tok, train_data, eval_data = po.load_inputs(cfg)
    assert po.make_plan(cfg, train_data).token_rewards == "column"
    assert po.make_plan(cfg, eval_data, eval_split=True).token_rewards == "zeros"  # the world's test pairs lack it
    run = po.train(cfg, model, tok, train_data, eval_data)
    assert (run / "final" / "model.safetensors").is_file()


def test_a_template_the_tokenizer_cannot_read_is_refused_with_the_fix(tmp_path):
    """A word-level tokenizer without a chat template (a new user's): the default draft form renders its request as
    plain text of unknown words, which gave credit AUROC 0.55 without a word. Now the command stops before loading
    the model and says what to pass; a control template in the tokenizer's words, {prompt} anywhere, passes."""
    import sys as _sys
    from pathlib import Path as _Path

    from finegrain.rewards.contrastive import checked_template, template_problems

    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "data"))
    from _tiny_tokenizers import word_tokenizer

    tok = word_tokenizer()
    assert not getattr(tok, "chat_template", None)
    draft = ContrastiveTemplate("draft")
    problems = template_problems(draft, tok, "the sky", "blue")
    assert any("needs a chat template" in p for p in problems) and any("unknown to the tokenizer" in p for p in problems)
    with pytest.raises(ConfigError, match="--template draft with --positive / --negative revision requests"):
        checked_template(draft, tok, "the sky", "blue", options=("--template", "--positive", "--negative"))
    words = " ".join(tok.convert_ids_to_tokens(list(range(5, 9))))  # words the tokenizer knows
    good = ContrastiveTemplate("control", words + " {prompt}", "{prompt} " + words)
    assert template_problems(good, tok, "the sky", "blue") == []
    # a whole revision request in the tokenizer's words needs no chat template either
    revision = ContrastiveTemplate("draft", words + " {prompt} {draft}", "{draft} {prompt} " + words)
    assert template_problems(revision, tok, "the sky", "blue") == []
