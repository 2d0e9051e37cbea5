"""lorafit.flags: underscores accepted for dashes, and the flag an unknown one most likely meant."""

import pytest

from lorafit.flags import dashed, suggest

KNOWN = ["-h", "--help", "--resume", "--model", "--device", "--dtype", "--output-dir", "--epochs", "--max-steps",
         "--batch-size", "--grad-accum", "--learning-rate", "--schedule", "--seed", "--data", "--data.path",
         "--data.max-seq-length", "--data.packing", "--data.seed", "--data.val-fraction", "--lora.r",
         "--lora.alpha", "--lora.dropout", "--lora.target-modules"]


@pytest.mark.parametrize("flag, meant", [
    ("--learning_rate", "--learning-rate"),  # underscores
    ("--Learning-Rate", "--learning-rate"),
    ("--r", "--lora.r"),  # a section's field without its prefix
    ("--max-seq-length", "--data.max-seq-length"),
    ("--max_seq_length", "--data.max-seq-length"),
    ("--packing", "--data.packing"),
    ("--lora-r", "--lora.r"),  # section joined with a dash
    ("--lora_alpha", "--lora.alpha"),
    ("--data_path", "--data.path"),
    ("--rank", "--lora.r"),  # names other tools use
    ("--lora_rank", "--lora.r"),
    ("--lr", "--learning-rate"),
    ("--num_train_epochs", "--epochs"),
    ("--per_device_train_batch_size", "--batch-size"),
    ("--gradient_accumulation_steps", "--grad-accum"),
    ("--learning-rat", "--learning-rate"),  # typos, through difflib
    ("--lora.rnk", "--lora.r"),
    ("--lora.dropuot", "--lora.dropout"),
    ("--max-step", "--max-steps"),
    ("--schedule=linear", "--schedule"),
])
def test_suggest(flag, meant):
    assert suggest(flag, KNOWN) == meant


def test_suggest_gives_up_on_nonsense():
    assert suggest("--zzz", KNOWN) is None
    assert suggest("--qwertyuiop", KNOWN) is None


def test_dashed_rewrites_only_known_flags():
    argv = ["train", "--learning_rate", "1e-4", "--max_steps=3", "--lora_r", "4", "--data.max_seq_length", "9",
            "a_b.yaml", "--", "--seed_x"]
    assert dashed(argv, KNOWN) == ["train", "--learning-rate", "1e-4", "--max-steps=3", "--lora_r", "4",
                                   "--data.max-seq-length", "9", "a_b.yaml", "--", "--seed_x"]
