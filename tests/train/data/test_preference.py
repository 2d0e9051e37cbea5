"""Preference data: TRL 1.16's tokenization through lorafit's prompt renderer, truncation, and one-line errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.train.data import (
    DataConfig,
    PairSample,
    UnpairedSample,
    describe_sample,
    load_data,
    read_records,
)
from lorafit.train.objectives.preference import collate_pairs
from tests.train.data.shared import write_lines

PLAIN = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Count to five: one two", "chosen": " three four five", "rejected": " three five"},
    {"prompt": "A very long prompt " * 6 + "ends", "chosen": " here.", "rejected": " there, or not."},
    {"prompt": "Q: capital of Italy? A:", "chosen": " Rome", "rejected": " Milan"},
]
CHAT = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
         "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in PLAIN]
IMPLICIT_TEXT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in PLAIN]
IMPLICIT_CHAT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CHAT]
UNPAIRED = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in PLAIN for k in ("chosen", "rejected")]


def trl_dpo_dataset(tok, records, max_length, truncation_mode, tmp_path):
    """TRL's own preprocessing of `records` (DPOTrainer._prepare_dataset) and its collator."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), max_length=max_length, truncation_mode=truncation_mode,
                         use_cpu=True, report_to=[], bf16=False)
    trainer = trl.DPOTrainer.__new__(trl.DPOTrainer)
    trainer._tokenizer = tok
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = trl.DPOTrainer._prepare_dataset(trainer, Dataset.from_list(records), tok, args, "train")
    collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length,
                                         truncation_mode=truncation_mode)
    return dataset, collator


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("records", [PLAIN, CHAT, IMPLICIT_TEXT, IMPLICIT_CHAT],
                         ids=["text", "chat", "implicit-text", "implicit-chat"])
def test_pairs_tokenize_and_truncate_as_trl(tokenizer, records, truncation_mode, tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", records)
    prompts = sorted(len(s.prompt_ids) for s in load_data(tokenizer, DataConfig(path=str(path))).train)
    # only the third record's prompt alone fills max_length (keep_start drops it, with a warning), and the
    # other pairs are cut too: truncation is on
    max_length = prompts[-2] + 2
    dataset, collator = trl_dpo_dataset(tokenizer, records, max_length, truncation_mode, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = load_data(tokenizer, DataConfig(path=str(path), max_seq_length=max_length,
                                                  truncation_mode=truncation_mode)).train
    dropped = [str(w.message) for w in caught if "were dropped" in str(w.message)]
    merged = [str(w.message) for w in caught if "not a token prefix" in str(w.message)]
    # "...two three four five" vs "...two three five": TRL's implicit prompt ends inside "f|our" / "f|ive"
    assert len(merged) == (records is IMPLICIT_TEXT) and all(f"{path}:2" in m for m in merged)
    if truncation_mode == "keep_start":
        assert len(samples) == len(records) - 1 and len(dropped) == 1 and "1 of 4 samples" in dropped[0]
        assert f"{path}:3" in dropped[0]  # names the first dropped record
    else:
        assert len(samples) == len(records) and not dropped
    assert len(dataset) == len(samples)
    ours = [(s.prompt_ids, s.chosen_ids, s.rejected_ids) for s in samples]
    theirs = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dataset]
    assert ours == theirs
    batch, expected = collate_pairs(samples, tokenizer.pad_token_id), collator([dict(r) for r in dataset])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], expected[key]), key
    assert batch["input_ids"].shape[1] == max_length  # some rows were truncated


def test_unpaired_records_tokenize_as_trl_kto(tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), max_length=24, use_cpu=True, report_to=[], bf16=False)
    trainer = trl.KTOTrainer.__new__(trl.KTOTrainer)
    trainer._tokenizer, trainer.calculate_KL = tokenizer, False
    trainer.desirable_weight = trainer.undesirable_weight = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = trl.KTOTrainer._prepare_dataset(trainer, Dataset.from_list(UNPAIRED), tokenizer, args, "train")
        samples = load_data(tokenizer, DataConfig(path=str(write_lines(tmp_path / "u.jsonl", UNPAIRED)),
                                                  max_seq_length=24)).train
        # KTO on paired data: unpaired as TRL unpairs them (the chosen of the pairs, then their rejected)
        unpaired = load_data(tokenizer, DataConfig(path=str(write_lines(tmp_path / "p.jsonl", PLAIN)),
                                                   max_seq_length=24), unpair=True).train
    assert [(s.prompt_ids, s.completion_ids, s.label) for s in samples] == \
        [(r["prompt_ids"], r["completion_ids"], r["label"]) for r in dataset]
    assert all(isinstance(s, UnpairedSample) for s in unpaired)
    assert [s.label for s in unpaired] == [True] * 3 + [False] * 3
    assert [s.completion_ids for s in unpaired] == [s.completion_ids for s in samples if s.label] + \
        [s.completion_ids for s in samples if not s.label]


def test_pairs_become_pair_samples_with_the_chat_format(tokenizer, tmp_path):
    splits = load_data(tokenizer, DataConfig(path=str(write_lines(tmp_path / "c.jsonl", CHAT))))
    assert splits.prompt_format.is_chat and all(isinstance(s, PairSample) for s in splits.train)
    shown = describe_sample(tokenizer, splits.train[0])
    assert "----- chosen" in shown and "«blue.<|im_end|>" in shown and "«green.<|im_end|>" in shown
    assert load_data(tokenizer, DataConfig(path=str(write_lines(tmp_path / "t.jsonl", PLAIN)))).prompt_format.kind == "text"


BAD = [
    ({"prompt": "x", "chosen": "y"}, ":1: field 'rejected' is missing"),
    ({"prompt": "x", "chosen": "", "rejected": "z"}, ":1: field 'chosen' is empty"),
    ({"prompt": "x", "chosen": [], "rejected": "z"}, ":1: field 'chosen' is empty"),
    ({"prompt": "x", "chosen": 3, "rejected": "z"}, ":1: field 'chosen' must be a string or a list of chat messages"),
    ({"prompt": "x", "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "z"}]},
     ":1: chosen[0]: field 'content' is missing"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": "y", "rejected": "z"},
     ":1: field 'chosen' is a string but prompt are chat messages"),
    ({"prompt": "x", "completion": "y", "label": 1}, ":1: field 'label' must be true or false, got 1"),
    ({"prompt": "x", "completion": "y", "label": "true"}, ":1: field 'label' must be true or false, got \"true\""),
    ({"completion": "y", "label": True}, ":1: field 'prompt' is missing"),
    ({"prompt": "x", "completion": "", "label": True}, ":1: field 'completion' is empty"),
]


@pytest.mark.parametrize("record,message", BAD, ids=[m.split(": ", 1)[1][:40] for _, m in BAD])
def test_bad_records_are_one_line_naming_file_line_and_field(tmp_path, record, message):
    path = write_lines(tmp_path / "d.jsonl", [record])
    with pytest.raises(LorafitError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}{message}") and "\n" not in str(e.value), e.value


def test_equal_chosen_and_rejected_are_counted_dropped_and_named(tokenizer, tmp_path):
    records = [PLAIN[0], {**PLAIN[1], "rejected": PLAIN[1]["chosen"]}, PLAIN[3],
               {"chosen": "same text", "rejected": "same text"}]
    path = write_lines(tmp_path / "d.jsonl", records)
    with pytest.warns(UserWarning, match=rf"2 of 4 pairs have chosen equal to rejected \(first: {path}:2\)"):
        samples = load_data(tokenizer, DataConfig(path=str(path))).train
    assert len(samples) == 2
    only_equal = write_lines(tmp_path / "e.jsonl", [records[1]])
    with pytest.raises(LorafitError, match="no preference sample is left"), pytest.warns(UserWarning):
        load_data(tokenizer, DataConfig(path=str(only_equal)))


def test_preference_and_supervised_data_do_not_mix(tokenizer, tmp_path):
    pairs = write_lines(tmp_path / "p.jsonl", PLAIN)
    sft = write_lines(tmp_path / "s.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(LorafitError, match="validation data is 'alpaca' records but the training data is 'paired'"):
        load_data(tokenizer, DataConfig(path=str(pairs), val_path=str(sft)))
    with pytest.raises(LorafitError, match="packing applies to supervised data"):
        load_data(tokenizer, DataConfig(path=str(pairs), packing=True))
    with pytest.raises(LorafitError, match="truncation_mode='middle' is unknown"):
        DataConfig(path="x", truncation_mode="middle")
