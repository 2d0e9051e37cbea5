"""The pre-flight view of the data: marked trained text, token counts."""

from lorafit.train.data import IGNORE, describe_sample, n_tokens, pack
from tests.train.data.shared import make_samples, sample_of


def test_describe_sample_marks_trained_text(tokenizer):
    sample = sample_of(tokenizer, "chat")
    header, body = describe_sample(tokenizer, sample).split("\n", 1)
    assert f"{len(sample)} tokens, {sample.n_trained} trained" in header
    assert "«Paris.<|im_end|>»" in body and "«Rome.<|im_end|>»" in body
    assert "Capital of France?" in body and "«Capital" not in body  # masked text is shown plain
    packed = describe_sample(tokenizer, pack([sample_of(tokenizer, "text")] * 2, 64)[0])
    assert packed.count("next packed sample") == 1


def test_n_tokens_counts_all_and_trained_tokens():
    samples = make_samples([4, 6], trained_from=2)
    assert n_tokens(samples) == (10, 6)
    samples[0].labels[-1] = IGNORE
    assert n_tokens(samples) == (10, 5)
