from finegrain.world.lexicon import vocabulary
from finegrain.world.tokenizer import build_tokenizer


def test_word_level_round_trip_offsets_and_specials(tmp_path):
    tok = build_tokenizer()
    assert len(tok) == len(vocabulary())
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "it flows gently . the river is deep and blue ."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    words = text.split()
    assert len(enc["input_ids"]) == len(words)  # one token per word
    assert [text[a:b] for a, b in enc["offset_mapping"]] == words
    assert tok.decode(enc["input_ids"]) == text
    assert tok("describe the river .")["input_ids"][0] == tok.bos_token_id
    assert tok("it is purple .", add_special_tokens=False)["input_ids"][2] == tok.unk_token_id
    rendered = tok.apply_chat_template([{"role": "user", "content": "describe the river ."}], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<bos> <|user|> describe the river .") or rendered.startswith("<bos><|user|>")
    assert rendered.rstrip().endswith("<|assistant|>")
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == enc["input_ids"]
    assert again.chat_template == tok.chat_template
