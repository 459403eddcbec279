"""split_by_length against a per-example Python loop (the definition in the docstring)."""

import pytest
import torch

from addax_kernels.data import sequence_lengths, split_by_length


def padded_batch(lengths, width=None, left=False, pad_token_id=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        span = slice(width - length, width) if left else slice(0, length)
        input_ids[row, span] = torch.randint(1, 100, (length,), generator=generator)
        mask[row, span] = 1
    labels = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, -100))
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "example_weight": torch.arange(len(lengths), dtype=torch.float32),  # per-example, 1-D
        "image_features": torch.randn(len(lengths), 3, generator=generator),  # per-example, not a sequence
        "ids": [f"example-{i}" for i in range(len(lengths))],
        "return_dict": True,  # shared by all examples
    }


def expected_side(batch, rows):
    """The examples at ``rows``, one by one."""
    side = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            side[key] = torch.stack([value[r] for r in rows])
        elif isinstance(value, list):
            side[key] = [value[r] for r in rows]
        else:
            side[key] = value
    return side


def assert_sides_equal(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        if isinstance(expected[key], torch.Tensor):
            assert torch.equal(got[key], expected[key]), key
        else:
            assert got[key] == expected[key], key


@pytest.mark.parametrize("left", [False, True])
def test_long_examples_go_to_zo_and_short_ones_to_fo(left):
    lengths = [5, 10, 3, 8, 6, 1]
    batch = padded_batch(lengths, left=left)
    zo, fo = split_by_length(batch, threshold=6)
    assert_sides_equal(zo, expected_side(batch, [i for i, n in enumerate(lengths) if n > 6]))
    assert_sides_equal(fo, expected_side(batch, [i for i, n in enumerate(lengths) if n <= 6]))


def test_an_empty_side_is_none():
    batch = padded_batch([4, 5, 6])
    zo, fo = split_by_length(batch, threshold=10)
    assert zo is None and fo is not None and torch.equal(fo["input_ids"], batch["input_ids"])
    zo, fo = split_by_length(batch, threshold=0)
    assert fo is None and torch.equal(zo["input_ids"], batch["input_ids"])


@pytest.mark.parametrize("left", [False, True])
def test_trim_padding_removes_only_columns_padded_in_every_example(left):
    lengths = [12, 3, 9, 5]
    batch = padded_batch(lengths, width=14, left=left)
    zo, fo = split_by_length(batch, threshold=6, trim_padding=True)
    for side, rows in ((zo, [0, 2]), (fo, [1, 3])):
        width = max(lengths[r] for r in rows)
        keep = slice(14 - width, 14) if left else slice(0, width)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(side[key], batch[key][rows][:, keep]), key
        assert side["image_features"].shape == (2, 3)  # not a sequence: untouched
        assert torch.equal(side["attention_mask"].sum(-1), torch.tensor([lengths[r] for r in rows]))


def test_trim_padding_leaves_the_decoder_side_of_an_encoder_decoder_batch():
    """A seq2seq batch padded to one width on both sides: the encoder's columns are trimmed, the
    decoder's labels and decoder_* tensors (their own lengths) keep every column."""
    batch = padded_batch([3, 2, 6, 5], width=8)
    generator = torch.Generator().manual_seed(3)
    batch["labels"] = torch.randint(10, 90, (4, 8), generator=generator)
    batch["decoder_attention_mask"] = torch.ones(4, 8, dtype=torch.long)
    zo, fo = split_by_length(batch, threshold=4, trim_padding=True, encoder_decoder=True)
    for side, rows, width in ((zo, [2, 3], 6), (fo, [0, 1], 3)):
        assert torch.equal(side["input_ids"], batch["input_ids"][rows][:, :width])
        assert torch.equal(side["labels"], batch["labels"][rows])
        assert torch.equal(side["decoder_attention_mask"], batch["decoder_attention_mask"][rows])
    # Decoder-only (the default): labels are the input's own columns and are trimmed with it.
    zo, fo = split_by_length(batch, threshold=4, trim_padding=True)
    assert fo["labels"].shape == (2, 3) and fo["decoder_attention_mask"].shape == (2, 8)


def test_lengths_from_mask_pad_token_or_width():
    batch = padded_batch([4, 7, 2], pad_token_id=5)
    assert sequence_lengths(batch).tolist() == [4, 7, 2]
    no_mask = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    assert sequence_lengths(no_mask, pad_token_id=5).tolist() == [4, 7, 2]
    assert sequence_lengths(no_mask).tolist() == [7, 7, 7]  # unpadded: every example is full width
    zo, fo = split_by_length(no_mask, 3, pad_token_id=5, trim_padding=True)
    assert zo["input_ids"].shape == (2, 7) and fo["input_ids"].shape == (1, 2)
    bool_mask = dict(batch, attention_mask=batch["attention_mask"].bool())
    assert sequence_lengths(bool_mask).tolist() == [4, 7, 2]


def test_sides_feed_a_model_forward():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    batch = padded_batch([9, 2, 7, 3])
    zo, fo = split_by_length(batch, threshold=5, trim_padding=True)
    model_keys = ("input_ids", "attention_mask", "labels")
    with torch.no_grad():
        for side in (zo, fo):
            assert torch.isfinite(model(**{k: side[k] for k in model_keys}).loss)


@pytest.mark.parametrize(
    "batch, threshold, kwargs, error",
    [
        ([[1, 2]], 3, {}, TypeError),
        ({"labels": torch.zeros(2, 3)}, 3, {}, ValueError),
        ({"input_ids": torch.zeros(3, dtype=torch.long)}, 3, {}, ValueError),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}, 3, {}, TypeError),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(3, 3)}, 3, {}, ValueError),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long), "ids": ["a"]}, 3, {}, ValueError),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, -1, {}, ValueError),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, True, {}, TypeError),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, float("nan"), {}, TypeError),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, 2, {"trim_padding": 1}, TypeError),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, 2, {"pad_token_id": 0.5}, TypeError),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, 2, {"encoder_decoder": 1}, TypeError),
    ],
)
def test_bad_inputs_are_rejected(batch, threshold, kwargs, error):
    with pytest.raises(error):
        split_by_length(batch, threshold, **kwargs)
