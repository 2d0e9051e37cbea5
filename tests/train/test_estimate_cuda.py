"""The CUDA memory model (lorafit.train.estimate.cuda) on the CPU: its structure, its arithmetic written
out by hand, its NF4 and ternary bytes against lorafit's real storage, the ternary dequantizer's peak
against the bytes its tensors really hold, and what one real block saves for backward against
`block_saved`. The measured check against a GPU is tests/train/test_estimate_gpu.py."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import lorafit as lf
from lorafit.train.estimate import (
    CUBLAS_WORKSPACE_BYTES,
    GIB,
    NF4_DOUBLE_QUANT_BYTES,
    SIZES,
    ModelShape,
    TrainSetup,
    cuda_peak,
    estimate,
    lora_params,
    peak_allocated,
    ternary_bytes,
)
from lorafit.train.estimate.cuda import (
    block_saved,
    block_working,
    dequantized_weight,
    loss_working,
    step_saved,
)


def cuda(**kw):
    return estimate(TrainSetup(**{"model": "8B", "method": "qlora", "batch": 1, "seq": 2048, **kw}))


@pytest.mark.parametrize("size", ["135M", "1B", "8B", "70B"])
def test_monotonic_in_batch_seq_and_rank(size):
    def allocated(**kw):
        return cuda(model=size, **kw).allocated

    for name, values in {"batch": (1, 2, 4, 8), "seq": (128, 512, 2048, 8192), "rank": (4, 8, 16, 64)}.items():
        totals = [allocated(**{name: v}) for v in values]
        assert totals == sorted(totals) and len(set(totals)) == len(totals), (name, totals)


@pytest.mark.parametrize("size", ["1B", "8B", "70B"])
@pytest.mark.parametrize("batch,seq", [(1, 512), (4, 4096)])
def test_ternary_below_qlora_below_lora_below_full(size, batch, seq):
    methods = ("ternary", "qlora", "lora", "full")
    totals = [cuda(model=size, method=m, batch=batch, seq=seq).total for m in methods]
    assert totals == sorted(totals) and len(set(totals)) == 4


@pytest.mark.parametrize("kw", [{}, {"method": "lora"}, {"method": "full"}, {"method": "ternary"}, {"batch": 1, "seq": 64},
                                {"grad_checkpointing": False}, {"loss_chunk": None}, {"model": "135M", "seq": 128}])
def test_terms_sum_to_the_total(kw):
    e = cuda(**kw)
    assert sum(e.terms().values()) == pytest.approx(e.total)
    assert e.allocated == pytest.approx(e.total - e.overhead)
    assert e.overhead == e.setup.overhead_gb * GIB and e.peak_phase in ("backward", "loss")
    lines = e.breakdown().splitlines()
    assert [line.split()[0] for line in lines[:8]] == list(e.terms())
    assert "max_memory_allocated" in lines[-1]


def test_hand_arithmetic_8b_qlora():
    """Llama-3.1-8B, QLoRA r=16 on all linears, 1 x 2048 tokens, bf16, checkpointing, chunked loss."""
    h, q, kv, i, heads, layers, vocab, hd, r, n = 4096, 4096, 1024, 14336, 32, 32, 128256, 128, 16, 2048
    s = SIZES["8B"]
    e = cuda()
    saved_block = (2 * (4 * h + 4) + 2 * h * 2) + ((q + 2 * kv) * 2 + q * 2 + 4 * heads) + 2 * i * 2 + 7 * r * 2
    working = h * 2 + h * 2 + 3 * i * 2  # recomputed output, incoming gradient, MLP backward
    across = layers * h * 2 + 2 * hd * 2 + 32  # checkpointed inputs, RoPE cos/sin, the int64 batch
    assert e.peak_phase == "backward"
    assert e.activations == n * (across + saved_block + working)
    assert e.workspace == CUBLAS_WORKSPACE_BYTES + i * h * 2  # + one dequantized MLP weight in bf16
    assert e.logits == 0  # the loss phase is smaller: no logits buffer at the peak
    chunk = (64 << 20) // (4 * vocab)
    assert cuda_peak(e.setup).logits == chunk * vocab * (4 + 2)
    trainable = lora_params(s, r)
    assert (e.master, e.gradients, e.optimizer) == (4 * trainable, 4 * trainable, 8 * trainable)
    assert e.weights == s.n_linear_params * NF4_DOUBLE_QUANT_BYTES + (s.n_params - s.n_linear_params) * 2


def test_hand_arithmetic_8b_ternary():
    """The same run on a packed ternary base: only the weights and the dequantized weight change."""
    h, i, vocab, layers = 4096, 14336, 128256, 32
    q, t = cuda(), cuda(method="ternary")
    assert t.peak_phase == "backward" and t.activations == q.activations
    assert (t.master, t.gradients, t.optimizer) == (q.master, q.gradients, q.optimizer)
    # down_proj's (4096 x 14336) weight: int8 values + the bf16 output scaled in place = 3 bytes a weight
    assert t.workspace == CUBLAS_WORKSPACE_BYTES + i * h * (1 + 2)
    rows = layers * (h + 1024 + 1024 + h + i + i + h)  # out_features of q, k, v, o, gate, up, down
    n = SIZES["8B"].n_linear_params
    assert t.weights == n // 4 + rows * 4 + (2 * vocab * h + (2 * layers + 1) * h) * 2  # + bf16 parts


def test_ternary_bytes_are_lorafit_storage():
    """`ternary_bytes` is what TernaryLinear layers really keep: packed codes and fp32 scales, per row
    and per group, with in_features that are not a multiple of 4 (rows padded to whole bytes)."""
    from lorafit.quant.apply import quantize_model
    from lorafit.quant.linear import weight_storage_bytes

    config = LlamaConfig(hidden_size=96, intermediate_size=258, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    shape = ModelShape.from_config(config)
    for group in (None, 6):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        quantize_model(model, "ternary", group_size=group)
        nbytes, params = weight_storage_bytes(model)
        assert params == shape.n_linear_params and nbytes == sum(ternary_bytes(shape, group))
    assert ternary_bytes(shape)[0] > shape.n_linear_params / 4  # down_proj's 258-wide rows take 65 bytes


def tensors(x):
    """The tensors in an op's (nested) arguments or outputs."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, list | tuple | dict):
        for y in x.values() if isinstance(x, dict) else x:
            yield from tensors(y)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create inside the mode while they are alive (a
    storage is freed when its last tensor or view goes; torch keeps one Python object per storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.alive: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.alive.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        for t in tensors(out):
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key in self.alive or key in inputs or not nbytes:
                continue  # a view, an in-place result, or nothing allocated
            self.alive.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_ternary_dequantize_peak_is_what_the_estimate_counts(dtype, name):
    """TernaryLinear.dequantize at its widest holds the int8 values and the output it scales in place:
    `dequantized_weight` counts 1 + d bytes per weight of the largest linear."""
    from lorafit.quant.ternary import TernaryLinear

    torch.manual_seed(0)
    out_f, in_f = 352, 128
    layer = TernaryLinear(torch.randn(out_f, in_f))
    layer.dequantize(dtype)  # the first call builds (and caches) the 1 KiB byte table: not the peak's
    with LiveBytes() as live:
        weight = layer.dequantize(dtype)
    assert live.live == weight.numel() * weight.element_size()  # only the result is left
    shape = ModelShape(hidden=in_f, intermediate=out_f, layers=1, heads=4, kv_heads=4, vocab=8)
    setup = TrainSetup(model=shape, method="ternary", dtype=name)
    assert live.peak == dequantized_weight(setup) == out_f * in_f * (1 + (2 if name == "bf16" else 4))


def test_the_peak_moves_to_the_loss_for_few_tokens_and_a_large_vocabulary():
    few = cuda(model="1B", batch=1, seq=128)  # 128 tokens: the (tokens x 128256) fp32 logits dominate
    assert few.peak_phase == "loss" and few.logits == 128 * 128256 * (4 + 2)
    assert few.workspace == CUBLAS_WORKSPACE_BYTES  # no block is being recomputed
    plain = cuda(model="1B", batch=1, seq=128, loss_chunk=None)
    assert plain.logits == 3 * 128 * 128256 * 4 and plain.total > few.total


def test_each_saving_the_trainer_makes_shows():
    base = cuda(batch=4)
    assert cuda(batch=4, grad_checkpointing=False).activations > base.activations
    assert cuda(batch=4, fused_mlp=False).activations > base.activations
    assert cuda(batch=4, double_quant=False).weights > base.weights
    assert cuda(batch=4, optimizer="adamw8bit").optimizer < base.optimizer
    setup = TrainSetup(model="8B", method="qlora", batch=4, seq=2048)
    assert block_working(setup) > 0 and loss_working(setup) > 0 and step_saved(setup) > 0


def test_peak_allocated_takes_a_model_config():
    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=2048)
    got = peak_allocated(config, batch=2, seq=256, rank=8)
    e = estimate(TrainSetup(model=config, method="qlora", rank=8, batch=2, seq=256, device="cuda"))
    assert got == round(e.allocated) and got < e.total
    assert peak_allocated(config, batch=4, seq=256, rank=8) > got


def test_nf4_bytes_per_weight_are_lorafit_storage():
    """NF4_DOUBLE_QUANT_BYTES is what an NF4Linear really keeps per weight (codes + statistics)."""
    from lorafit.quant.apply import quantize_model
    from lorafit.quant.linear import weight_storage_bytes

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    quantize_model(model, "nf4")
    nbytes, params = weight_storage_bytes(model)
    layers = 2 * 7
    assert nbytes == pytest.approx(params * NF4_DOUBLE_QUANT_BYTES + layers * 4, rel=1e-3)  # + fp32 offset each


def test_one_block_saves_what_block_saved_counts():
    """Bytes one real decoder block (prepared as the Trainer prepares it, bf16) saves for backward,
    counted tensor by tensor through a saved-tensors hook, against `block_saved`. Three differences
    are by design and written out: under an outer hook GatedMLP stays plain and keeps the SwiGLU
    product (i d); on the CPU the fused LoRA's thin v is fp32 (CUDA: bf16); RoPE's cos and sin are
    saved by the block too (shared by all blocks, `step_saved` counts them once)."""
    from lorafit.train.config import TrainConfig
    from lorafit.train.prepare import prepare_model

    h, i, heads, kv_heads, r, batch, seq = 256, 704, 8, 2, 8, 2, 128
    config = LlamaConfig(vocab_size=512, hidden_size=h, intermediate_size=i, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    prepare_model(model, TrainConfig(lora=lf.LoraConfig(r=r, target_modules="all-linear")))
    model.train()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    position_ids = torch.arange(seq).expand(batch, seq)
    hidden = torch.randn(batch, seq, h, dtype=torch.bfloat16, requires_grad=True)
    cos_sin = model.model.rotary_emb(hidden, position_ids)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](hidden, attention_mask=None, position_embeddings=cos_sin, position_ids=position_ids)
    setup = TrainSetup(model=config, method="lora", rank=r, batch=batch, seq=seq, device="cuda")
    head_dim, d = h // heads, 2
    expected = block_saved(setup) + i * d + 7 * r * (4 - d) + 2 * head_dim * d
    assert sum(saved.values()) == batch * seq * expected
