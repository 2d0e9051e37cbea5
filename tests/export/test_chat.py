"""Acceptance 3: SmolLM2 with a demo-style adapter, exported to one GGUF, answers held-out demo
questions through llama.cpp's chat completion, which formats the messages with the chat template
that travels in the file (no chat format is given to llama.cpp)."""

from lorafit.train.data import alpaca_user_text
from lorafit.train.demo_task import exact_match
from tests.export.kit import llama, needs_llama_cpp

pytestmark = needs_llama_cpp
N_QUESTIONS = 20


def _answers(path, records) -> list[str]:
    llm = llama(path, f32_cache=False, n_ctx=512)
    assert llm.chat_format == "chat_template.default"  # formatted by the file's own template
    out = []
    for r in records:
        reply = llm.create_chat_completion([{"role": "user", "content": alpaca_user_text(r["instruction"], r["input"])}],
                                           max_tokens=16, temperature=0.0)
        out.append(reply["choices"][0]["message"]["content"])
    llm.close()
    return out


def test_exported_demo_model_answers_held_out_questions(demo_adapter, smollm2_merged, smollm2_gguf):
    _, held_out = demo_adapter
    records = held_out[:N_QUESTIONS]
    path = smollm2_gguf("f16")
    assert llama(path).metadata["tokenizer.chat_template"] == smollm2_merged[1].chat_template
    answers = _answers(path, records)
    right = [exact_match(a, r["output"]) for a, r in zip(answers, records)]
    print(f"llama.cpp chat completion, exported SmolLM2 + demo adapter: {sum(right)}/{len(right)} held-out dates right")
    for a, r in list(zip(answers, records))[:3]:
        print(f"  {r['input']!r} -> {a!r} (wanted {r['output']})")
    assert sum(right) >= 0.4 * len(right)  # 20 steps reach 13/20 here; the bundled model alone gets 1/20
