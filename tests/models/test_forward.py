import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from finegrain.models.forward import hidden_states, output_head, predicting_states, reading_states
from finegrain.types import CompletionBatch

V = 40


def tiny(arch: str):
    common = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    else:
        klass = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
        cfg = klass(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral"])
def test_padded_layout_matches_unpadded_forward(arch):
    """Each row, run alone without padding, gives the same logits as inside the padded batch."""
    model = tiny(arch)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g) for n in (3, 5)]
    responses = [torch.randint(3, V, (n,), generator=g) for n in (4, 2)]
    P, T = 5, 4
    batch = CompletionBatch(
        prompt_input_ids=torch.stack([torch.cat([torch.zeros(P - len(p), dtype=torch.long), p]) for p in prompts]),
        prompt_attention_mask=torch.stack([torch.cat([torch.zeros(P - len(p)), torch.ones(len(p))]).long() for p in prompts]),
        completion_input_ids=torch.stack([torch.cat([r, torch.zeros(T - len(r), dtype=torch.long)]) for r in responses]),
        completion_mask=torch.stack([torch.cat([torch.ones(len(r)), torch.zeros(T - len(r))]).bool() for r in responses]),
    )
    with torch.no_grad():
        h = hidden_states(model, batch)
        head = output_head(model)
        pred = head(predicting_states(h, batch))
        read = reading_states(h, batch)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            full = torch.cat([p, r])[None]
            out = model(full, output_hidden_states=True)
            want = out.logits[0, len(p) - 1 : len(p) - 1 + len(r)]
            torch.testing.assert_close(pred[i, : len(r)], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(read[i, : len(r)], out.hidden_states[-1][0, len(p) : len(p) + len(r)],
                                       atol=1e-5, rtol=1e-5)
