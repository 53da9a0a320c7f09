"""Text conditioning: the fixtures' tokens and embeddings, null rows, padding, errors, the random T5."""
import json
import logging
import shutil
import warnings

import pytest
import torch

from magnet_engine.engine.conditioning import TextConditioner
from magnet_engine.engine.random_weights import build_random_t5
from magnet_engine.errors import CheckpointError, InvalidInputError, InvalidOptionError, ModelNotFoundError

PROJ = "condition_provider.conditioners.description.output_proj."
PAD, EOS, UNK = 0, 1, 2
LONG = "a much longer description of a song with many words, warm piano and soft vinyl crackle"


def projection(d_t5: int, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, d_t5, generator=gen), torch.randn(dim, generator=gen)


@pytest.fixture(scope="module")
def fixture_conditioner(fixtures):
    state = torch.load(fixtures / "checkpoint" / "state_dict.bin", weights_only=True)["best_state"]
    return TextConditioner.load(str(fixtures / "t5"), state[PROJ + "weight"], state[PROJ + "bias"])


@pytest.fixture(scope="module")
def random_t5(tmp_path_factory):
    return build_random_t5(tmp_path_factory.mktemp("t5"), seed=3)


@pytest.fixture(scope="module")
def random_conditioner(random_t5):
    return TextConditioner.load(str(random_t5), *projection(32))


def test_fixture_tokens_hidden_and_embeds(fixture_conditioner, golden):
    want = golden["conditioning"]
    got = fixture_conditioner.encode(want["texts"])
    assert torch.equal(got.input_ids, want["input_ids"])
    assert torch.equal(got.mask, want["attention_mask"]) and torch.equal(got.mask, want["cond_mask"])
    assert (got.t5_hidden - want["t5_last_hidden_state"]).abs().max() < 1e-5
    assert (got.embeds - want["cond_embeds"]).abs().max() < 1e-5


def test_null_rows_exactly_zero(fixture_conditioner):
    cond = fixture_conditioner.encode(["warm piano", LONG, "techno"])
    assert cond.embeds.shape[0] == cond.mask.shape[0] == cond.input_ids.shape[0] == 6
    assert torch.count_nonzero(cond.embeds[3:]) == 0 and torch.count_nonzero(cond.mask[3:]) == 0
    assert (cond.input_ids[3:, 0] == EOS).all() and (cond.input_ids[3:, 1:] == PAD).all()
    assert (cond.embeds[:3].abs().sum(-1)[cond.mask[:3].bool()] > 0).all()  # real tokens are not zero


def test_empty_and_none_are_eos_only_with_zero_mask(fixture_conditioner):
    ids, mask = fixture_conditioner.tokenize(["", "warm piano", None])
    for row in (0, 2):
        assert ids[row, 0] == EOS and (ids[row, 1:] == PAD).all() and torch.count_nonzero(mask[row]) == 0
    assert mask[1].sum() == ids.shape[1] and ids[1, -1] == EOS
    assert torch.count_nonzero(fixture_conditioner.encode(["", "warm piano"]).embeds[0]) == 0


def test_padded_to_longest_row_and_not_trimmed(fixture_conditioner):
    alone = fixture_conditioner.encode(["piano"])
    together = fixture_conditioner.encode(["piano", LONG])
    n, s = alone.input_ids.shape[1], int(together.mask[1].sum())
    assert n < s and together.input_ids.shape[1] == together.embeds.shape[1] == s
    assert together.input_ids[1, s - 1] == EOS
    # The short row is padded further: same tokens, zero vectors after them, and its T5 states
    # ignore the padding (T5's self-attention is masked; only the LM's cross-attention is not).
    assert torch.equal(together.input_ids[0, :n], alone.input_ids[0]) and (together.input_ids[0, n:] == PAD).all()
    assert torch.count_nonzero(together.embeds[0, n:]) == 0
    assert (together.embeds[0, :n] - alone.embeds[0]).abs().max() < 1e-5


@pytest.mark.parametrize("bad", [[], (), "just a string", None, [3], ["fine", b"bytes"], ("fine", 1.0)])
def test_bad_descriptions(fixture_conditioner, bad):
    with pytest.raises(InvalidInputError):
        fixture_conditioner.encode(bad)
    with pytest.raises(InvalidInputError):
        fixture_conditioner.tokenize(bad)


def test_max_text_tokens(random_t5):
    limited = TextConditioner.load(str(random_t5), *projection(32), max_text_tokens=4)
    assert limited.encode(["piano"]).embeds.shape[0] == 2
    with pytest.raises(InvalidInputError, match=r"description 1 is \d+ tokens long .* limit is 4"):
        limited.encode(["piano", LONG])
    with pytest.raises(InvalidOptionError):
        TextConditioner.load(str(random_t5), *projection(32), max_text_tokens=0)


def test_d_t5_mismatch_and_bad_projection(random_t5):
    with pytest.raises(CheckpointError, match=r"d_t5=768 \(t5-base\) .* has d_model 32"):
        TextConditioner.load(str(random_t5), *projection(768))
    with pytest.raises(CheckpointError, match="output_proj"):
        TextConditioner.load(str(random_t5), torch.zeros(16 * 32), torch.zeros(16))
    with pytest.raises(CheckpointError, match="output_proj"):
        TextConditioner.load(str(random_t5), torch.zeros(16, 32), torch.zeros(15))


def test_missing_t5(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        TextConditioner.load(str(tmp_path / "no-such-t5"), *projection(32))
    with pytest.raises(ModelNotFoundError, match="spiece.model"):
        TextConditioner.load(str(tmp_path), *projection(32))  # exists, but empty


def test_random_t5_round_trip_deterministic(random_t5, random_conditioner, tmp_path):
    from transformers import T5Tokenizer

    again = build_random_t5(tmp_path / "again", seed=3)
    other = build_random_t5(tmp_path / "other", seed=4)
    files = sorted(p.name for p in random_t5.iterdir())
    assert {"config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"} <= set(files)
    assert all((random_t5 / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert (random_t5 / "spiece.model").read_bytes() == (other / "spiece.model").read_bytes()
    assert (random_t5 / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()

    tokenizer = T5Tokenizer.from_pretrained(str(random_t5))
    assert tokenizer.convert_ids_to_tokens([PAD, EOS, UNK]) == ["<pad>", "</s>", "<unk>"]
    assert len(tokenizer) == 256 + 100  # the trained pieces, then T5's <extra_id_*>

    texts = ["Warm 80s synthwave, 120 bpm!", "Zebra QX-9 jazz"]
    a = random_conditioner.encode(texts)
    b = TextConditioner.load(str(again), *projection(32)).encode(texts)
    c = TextConditioner.load(str(other), *projection(32)).encode(texts)
    assert a.embeds.shape == (4, a.input_ids.shape[1], 16)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.embeds, b.embeds)
    assert torch.equal(a.input_ids, c.input_ids) and not torch.allclose(a.embeds[:2], c.embeds[:2])
    assert not (a.input_ids == UNK).any()  # every ASCII character has a piece


def test_build_random_t5_refuses_bad_arguments(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        build_random_t5(busy)
    with pytest.raises(InvalidInputError, match="multiple of num_heads"):
        build_random_t5(tmp_path / "odd", d_model=30, num_heads=4)
    with pytest.raises(InvalidInputError, match="100000-piece"):
        build_random_t5(tmp_path / "huge", vocab_size=100_000)
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no staging directory left behind
    assert (busy / "keep.txt").read_text() == "mine"


def test_loading_and_long_texts_warn_nothing(random_t5, tmp_path):
    """A tokenizer config like t5-base's (no `legacy`, model_max_length 512) makes plain
    transformers warn on load and on a text over 512 tokens; the conditioner must not."""
    t5_base_like = shutil.copytree(random_t5, tmp_path / "t5")
    config_path = t5_base_like / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["legacy"]
    config_path.write_text(json.dumps(dict(config, model_max_length=512)))

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            conditioner = TextConditioner.load(str(t5_base_like), *projection(32))
            cond = conditioner.encode([" ".join(["piano"] * 600)])
    finally:
        logger.removeHandler(handler)
    assert cond.input_ids.shape[1] > 512
    assert [r.getMessage() for r in records] == [] and [str(w.message) for w in caught] == []
