"""Text conditioning against the fixtures, the null rows, and the random T5 builder."""
import pytest
import torch

from magnet_engine.engine.conditioning import TextConditioner, build_random_t5
from magnet_engine.errors import CheckpointError, InvalidInputError, ModelNotFoundError

PROJ = "condition_provider.conditioners.description.output_proj."


@pytest.fixture(scope="module")
def fixture_conditioner(fixtures):
    state = torch.load(fixtures / "checkpoint" / "state_dict.bin", weights_only=True)["best_state"]
    return TextConditioner.load(str(fixtures / "t5"), state[PROJ + "weight"], state[PROJ + "bias"])


@pytest.fixture(scope="module")
def random_t5(tmp_path_factory):
    return build_random_t5(tmp_path_factory.mktemp("t5"), seed=3)


def test_fixture_tokens_hidden_and_embeds(fixture_conditioner, golden):
    want = golden["conditioning"]
    got = fixture_conditioner.encode(want["texts"])
    assert torch.equal(got.input_ids, want["input_ids"])
    assert torch.equal(got.mask, want["attention_mask"])
    assert (got.t5_hidden - want["t5_last_hidden_state"]).abs().max() < 1e-5
    assert (got.embeds - want["cond_embeds"]).abs().max() < 1e-5


def test_null_rows_zero_and_padding(fixture_conditioner):
    cond = fixture_conditioner.encode(["a much longer description of a song with many words", "short", None])
    assert cond.embeds.shape[0] == 6
    assert torch.equal(cond.embeds[3:], torch.zeros_like(cond.embeds[3:]))
    assert torch.equal(cond.embeds[2], torch.zeros_like(cond.embeds[2]))       # None text: zero row too
    assert cond.input_ids.shape[1] == int(cond.mask[0].sum())                  # padded to the longest row
    assert (cond.input_ids[cond.mask.bool().logical_not() & (cond.input_ids != 0)] == 1).all()
    padded = cond.mask[1] == 0
    assert torch.equal(cond.embeds[1][padded], torch.zeros_like(cond.embeds[1][padded]))


def test_empty_string_is_eos_only(fixture_conditioner):
    ids, mask = fixture_conditioner.tokenize(["", None])
    assert ids.tolist() == [[1], [1]] and mask.tolist() == [[0], [0]]


def test_bad_inputs(fixture_conditioner, random_t5):
    for bad in ([], "just a string", [3], None):
        with pytest.raises(InvalidInputError):
            fixture_conditioner.encode(bad)
    with pytest.raises(ModelNotFoundError):
        TextConditioner.load("/no/such/t5/dir", torch.zeros(8, 32), torch.zeros(8))
    with pytest.raises(CheckpointError, match="d_t5=768.*d_model 32"):
        TextConditioner.load(str(random_t5), torch.zeros(8, 768), torch.zeros(8))
    limited = TextConditioner.load(str(random_t5), torch.zeros(8, 32), torch.zeros(8), max_text_tokens=3)
    with pytest.raises(InvalidInputError, match="limit is 3"):
        limited.encode(["warm piano with soft vinyl crackle and drums"])


def test_random_t5_round_trip_deterministic(random_t5, tmp_path):
    proj_w, proj_b = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)), torch.zeros(16)
    a = TextConditioner.load(str(random_t5), proj_w, proj_b).encode(["warm piano", "techno beat"])
    again = build_random_t5(tmp_path / "again", seed=3)
    b = TextConditioner.load(str(again), proj_w, proj_b).encode(["warm piano", "techno beat"])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.embeds, b.embeds)
    assert a.embeds.shape == (4, a.input_ids.shape[1], 16) and (a.input_ids[:, -1] <= 1).all()
    assert a.embeds[:2].abs().sum() > 0
