"""Records -> ids and labels: response-only masking, stop tokens, chat templates, the Alpaca prompt."""

import pytest

from lorafit.errors import LorafitError
from lorafit.train.data import IGNORE
from tests.train.data.shared import ALPACA, CHAT, TEXT, last_trained, sample_of, trained_runs


@pytest.mark.parametrize("shape", ["alpaca", "chat", "text"])
def test_every_sample_ends_with_a_trained_stop_token(tokenizer, shape):
    s = sample_of(tokenizer, shape)
    assert len(s.input_ids) == len(s.labels)
    assert s.labels[-1] == s.input_ids[-1] == last_trained(s)
    assert tokenizer.convert_ids_to_tokens(last_trained(s)) in {tokenizer.eos_token, "<|im_end|>"}


def test_plain_alpaca_prompt_ends_with_eos(plain_tokenizer):
    s = sample_of(plain_tokenizer, "alpaca")
    assert last_trained(s) == plain_tokenizer.eos_token_id


def test_alpaca_trains_only_the_output(tokenizer):
    s = sample_of(tokenizer, "alpaca")
    assert trained_runs(tokenizer, s) == ["1998-03-03<|im_end|>"]
    # The masked part is exactly the chat template's prompt with the generation header.
    user = ALPACA["instruction"] + "\n\n" + ALPACA["input"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert s.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(s.labels[: len(prompt_ids)]) == {IGNORE}
    assert IGNORE not in s.labels[len(prompt_ids) :]


def test_plain_alpaca_template_without_chat_template(plain_tokenizer):
    tok = plain_tokenizer
    s = sample_of(tok, "alpaca")
    masked = tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab == IGNORE])
    assert ALPACA["instruction"] in masked and ALPACA["input"] in masked and "### Input:" in masked
    assert trained_runs(tok, s) == ["1998-03-03" + tok.eos_token]
    no_input = sample_of(tok, "alpaca", {"instruction": "Say hi.", "output": "hi"})
    assert "### Input:" not in tok.decode(no_input.input_ids)


def test_chat_trains_each_assistant_turn_and_its_end_token(tokenizer):
    s = sample_of(tokenizer, "chat")
    assert trained_runs(tokenizer, s) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    # Everything else -- system, user turns, role headers -- is masked.
    masked = tokenizer.decode([t for t, lab in zip(s.input_ids, s.labels) if lab == IGNORE])
    for m in CHAT["messages"]:
        assert (m["content"] in masked) == (m["role"] != "assistant")


def test_chat_drops_turns_after_the_last_assistant(tokenizer):
    fields = {"messages": CHAT["messages"][:3] + [{"role": "user", "content": "Thanks!"}]}
    s = sample_of(tokenizer, "chat", fields)
    assert "Thanks!" not in tokenizer.decode(s.input_ids)
    assert trained_runs(tokenizer, s) == ["Paris.<|im_end|>"]


def test_text_trains_everything(tokenizer):
    s = sample_of(tokenizer, "text")
    assert IGNORE not in s.labels
    assert tokenizer.decode(s.input_ids) == TEXT["text"] + tokenizer.eos_token


@pytest.mark.parametrize("shape", ["alpaca", "chat"])
def test_train_on_prompt_trains_every_token(tokenizer, shape):
    masked, full = sample_of(tokenizer, shape), sample_of(tokenizer, shape, train_on_prompt=True)
    assert full.input_ids == masked.input_ids and full.labels == full.input_ids
    assert masked.n_trained < full.n_trained


def test_template_rejections_are_user_errors(tokenizer, monkeypatch):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
    strict += "{% endif %}{{ m['content'] }}{% endfor %}"
    monkeypatch.setattr(tokenizer, "chat_template", strict)
    with pytest.raises(
        LorafitError, match=r"mem:1: field 'messages': the chat template rejects it \(no system role"
    ):
        sample_of(tokenizer, "chat")


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer, monkeypatch):
    # This template marks only the last message, so a turn rendered alone is not a prefix of the chat.
    marks_last = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} END{% endif %}\n"
    )
    marks_last += "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    monkeypatch.setattr(tokenizer, "chat_template", marks_last)
    with pytest.raises(LorafitError, match=r"mem:1: field 'messages\[2\]': .* not .* token prefix"):
        sample_of(tokenizer, "chat")
    s = sample_of(tokenizer, "chat", train_on_prompt=True)  # the suggested way out works
    assert s.labels == s.input_ids and s.input_ids[-1] == tokenizer.eos_token_id


# A template that, as Qwen3's does, renders an assistant turn's reasoning (a <think> block in the content or a
# reasoning_content field) only for turns after the last user message, and drops it from earlier turns.
THINKING = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is defined else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}")


@pytest.mark.parametrize("where", ["content", "field"])
def test_thinking_is_trained_and_served_as_rendered(tokenizer, monkeypatch, where):
    from lorafit.prompt import PromptFormat, prompt_ids

    monkeypatch.setattr(tokenizer, "chat_template", THINKING)
    reply = ({"role": "assistant", "content": "<think>\nsix times seven\n</think>\n\n42"} if where == "content" else
             {"role": "assistant", "content": "42", "reasoning_content": "six times seven"})
    s = sample_of(tokenizer, "chat", {"messages": [{"role": "user", "content": "6*7?"}, reply]})
    assert trained_runs(tokenizer, s) == ["<think>\nsix times seven\n</think>\n\n42<|im_end|>"]
    # generate and serve prompt with exactly the untrained start of the sample: the reply begins with the thinking
    prompt = prompt_ids(tokenizer, PromptFormat("chat"), "6*7?")
    assert s.input_ids[:len(prompt)] == prompt and set(s.labels[:len(prompt)]) == {IGNORE}
    assert s.labels[len(prompt)] != IGNORE


def test_earlier_turns_whose_reasoning_the_template_drops_are_not_trained(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", THINKING)
    messages = [{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": "<think>\nsix sevens\n</think>\n\n42"},
                {"role": "user", "content": "and 6*8?"}, {"role": "assistant", "content": "<think>\nsix eights\n</think>\n\n48"}]
    with pytest.warns(UserWarning, match="earlier assistant turns differently in the history .* not trained"):
        s = sample_of(tokenizer, "chat", {"messages": messages})
    assert trained_runs(tokenizer, s) == ["<think>\nsix eights\n</think>\n\n48<|im_end|>"]
    assert "six sevens" not in tokenizer.decode(s.input_ids)  # the history as the template shows it


def test_the_stop_token_stays_a_trained_label_when_pad_is_eos(tokenizer):
    """SmolLM2's pad token is its EOS, <|im_end|>, which also ends every turn: padding never masks it."""
    from lorafit.train.data import collate
    from lorafit.train.loss import n_targets

    assert tokenizer.eos_token == "<|im_end|>"
    short, long = sample_of(tokenizer, "alpaca"), sample_of(tokenizer, "chat")
    batch = collate([short, long], pad_id=tokenizer.eos_token_id)
    n = len(short)
    assert batch["labels"][0, n - 1] == tokenizer.eos_token_id == batch["input_ids"][0, n - 1]
    assert (batch["input_ids"][0, n:] == tokenizer.eos_token_id).all() and (batch["labels"][0, n:] == IGNORE).all()
    assert n_targets(batch) == short.n_trained + long.n_trained  # the stop tokens included
