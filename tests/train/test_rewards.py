"""GRPO's reward functions: the shipped ones, loading by module:function and file.py:function with options,
TRL's signature, None rewards, and one-line errors naming the function."""

from __future__ import annotations

import math

import pytest

from lorafit.errors import LorafitError
from lorafit.train.rewards import check_columns, load_reward, load_rewards

CHAT = [{"role": "assistant", "content": "1998-03-03\nbecause..."}]


def call(spec, completions, **columns):
    reward = load_reward(spec)
    return reward(["p"] * len(completions), completions, [[1, 2, 3]] * len(completions), columns)


def test_exact_match_against_a_column_with_none_left_out():
    got = call({"name": "exact_match", "column": "iso"}, [" 1998-03-03 ", "1998-03-04", "x"], iso=["1998-03-03",
                                                                                                  "1998-03-03", None])
    assert got[:2] == [1.0, 0.0] and math.isnan(got[2])  # None: no reward from this function
    assert call({"name": "exact_match", "first_line": True}, [CHAT], answer=["1998-03-03"]) == [1.0]
    assert call("exact_match", [CHAT], answer=["1998-03-03"]) == [0.0]  # the whole text must match


def test_regex_length_and_json():
    assert call({"name": "regex_match", "pattern": r"\d{4}-\d\d-\d\d"}, ["2001-01-01", "2001-1-1"]) == [1.0, 0.0]
    assert call({"name": "regex_match", "pattern": "ISO", "search": True}, ["an ISO date", "none"]) == [1.0, 0.0]
    assert call({"name": "length_target", "target": 3}, ["abc"]) == [1.0]  # 3 tokens
    assert call({"name": "length_target", "target": 4, "unit": "chars"}, ["ab", "abcdefgh"]) == [0.5, 0.0]
    assert call("json_valid", ['{"a": 1}', '```json\n[1, 2]\n```', "{a: 1}"]) == [1.0, 1.0, 0.0]


def test_a_function_in_a_file_gets_the_columns_it_names(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def score(prompts, completions, answer, scale=1.0):\n"
                    "    return [scale * (c == a) for c, a in zip(completions, answer)]\n")
    reward = load_reward({"name": f"{path}:score", "scale": 2.0})
    assert reward.name == "score" and reward.required == ("answer",)
    assert reward(["p", "q"], ["4", "5"], [[1], [2]], {"answer": ["4", "4"], "other": [0, 0]}) == [2.0, 0.0]
    [a, b] = load_rewards(["exact_match", "exact_match"])
    assert (a.name, b.name) == ("exact_match", "exact_match_2")
    assert load_reward("lorafit.train.rewards:json_valid").name == "json_valid"  # module:function


@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown reward 'nope'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("missing.py:f", "missing.py not found"),
    ("lorafit.train.rewards:nothing", "lorafit.train.rewards has no 'nothing'"),
    ("lorafit.train.rewards:CALL_ARGS", "is not callable"),
    ("lorafit.train.rewards:text_of", "text_of takes (completion"),
    ({"name": "exact_match", "colum": "x"}, "exact_match has no option 'colum'"),
    ({"column": "x"}, "a mapping needs name"),
])
def test_bad_specs_are_one_line(spec, message):
    with pytest.raises(LorafitError) as e:
        load_reward(spec)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_results_and_missing_columns_are_one_line(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def text(prompts, completions, **kw):\n    return ['high'] * len(completions)\n"
                    "def scalar(prompts, completions, **kw):\n    return 1.0\n")
    for name, message in (("text", "returned 'high': rewards are numbers"), ("scalar", "returned float, not a list")):
        with pytest.raises(LorafitError, match=message):
            load_reward(f"{path}:{name}")(["p"], ["c"], [[1]], {})
    with pytest.raises(LorafitError, match="exact_match compares with the column 'answer'"):
        check_columns([load_reward(f"{path}:text"), load_reward("lorafit.train.rewards:exact_match")], {"x"}, "d.jsonl")
