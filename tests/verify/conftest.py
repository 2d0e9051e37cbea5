"""The verify tests' fixtures: SmolLM2's real tokenizer (shared with the training-room tests)."""

from tests.train.conftest import tokenizer  # noqa: F401  (a fixture)
