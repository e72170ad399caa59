"""The reward-source protocol and the finiteness check."""

import pytest
import torch

from finegrain.errors import NonFiniteError
from finegrain.rewards import RewardSource, check_finite, place_on_last_token
from finegrain.types import CompletionBatch, TokenRewards


class LengthReward:
    """A toy source: sequence score = response length, on the last token."""

    name = "length"

    def token_rewards(self, batch: CompletionBatch) -> TokenRewards:
        score = batch.completion_mask.sum(1).float()
        return TokenRewards(place_on_last_token(score, batch.completion_mask), batch.completion_mask, score)


def toy_batch():
    return CompletionBatch(
        prompt_input_ids=torch.ones(2, 2, dtype=torch.long),
        prompt_attention_mask=torch.ones(2, 2, dtype=torch.long),
        completion_input_ids=torch.ones(2, 3, dtype=torch.long),
        completion_mask=torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
    )


def test_protocol_and_a_finite_source():
    source = LengthReward()
    assert isinstance(source, RewardSource)
    rewards = source.token_rewards(toy_batch())
    assert check_finite(rewards, source.name) is rewards
    assert rewards.values.tolist() == [[0, 2, 0], [0, 0, 3]]


@pytest.mark.parametrize("field, row", [("values", 1), ("seq_reward", 0)])
def test_non_finite_rewards_name_the_source(field, row):
    values, seq = torch.zeros(2, 3), torch.zeros(2)
    (values[row, 1] if field == "values" else seq[row:row + 1]).fill_(float("nan"))
    if field == "values":
        values[1, 2] = float("inf")
    rewards = TokenRewards(values, torch.ones(2, 3, dtype=torch.bool), seq)
    with pytest.raises(NonFiniteError, match=rf"'my_rm'.*non-finite {field}.*row {row}"):
        check_finite(rewards, "my_rm")


def test_nan_on_masked_positions_is_caught_too():
    values = torch.zeros(1, 3)
    values[0, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="1 non-finite values"):
        check_finite(TokenRewards(values, torch.tensor([[True, True, False]])), "src")
