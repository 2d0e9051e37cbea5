"""GGUF export: a merged model, or an adapter alone, as files llama.cpp (and Ollama, LM Studio) load.

    arch.py        supported families and the hyperparameters llama.cpp reads for each
    layout.py      HF parameter -> GGUF tensor name, the Q/K rotary permutation, Gemma's norm shift
    vocab.py       the tokenizer (vocab, merges, types, special tokens, pre-tokenizer, chat template)
    writer.py      tensor encodings (f32/f16/bf16/q8_0/q4_0) and the streamed, atomic GGUF writer
    model_gguf.py  a whole merged model as one GGUF
    lora_gguf.py   an adapter as a GGUF LoRA
    run.py         the `lorafit export` and `lorafit merge` commands
"""

from lorafit.export.lora_gguf import export_gguf_lora
from lorafit.export.model_gguf import export_gguf

__all__ = ["export_gguf", "export_gguf_lora"]
