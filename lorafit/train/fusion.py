"""Module swaps that make training leaner, each made only where a probe shows identical outputs.

`GatedMLP`: a gated (SwiGLU) MLP that keeps two activations per layer instead of four for backward.

Llama-style MLPs compute `down(silu(gate(x)) * up(x))`. Under plain autograd, backward keeps four
(tokens x intermediate) tensors per layer: g = gate(x), silu(g) and u = up(x) for the product, and
a = silu(g) * u, the input of `down` (its LoRA A-gradient needs it). With g and u kept, the other two
are one elementwise pass away, so here:

    a = SwiGLUFunction(g, u)        saves g and u; silu(g) is recomputed in its backward
    y = down(a)                     whatever `down` saves of `a` is replaced by a marker while it
                                    runs, and recomputed from g and u when backward unpacks it

For SmolLM2-135M at 4 x 256 tokens that is 360 MB less kept for backward, at the price of two
elementwise passes per layer in backward. The numbers are the plain path's: forward is the same
operations in the same order; backward differs only in rounding (tests/train/test_fusion.py).

`fuse_gated_mlps(model)` swaps each matching MLP module for a `GatedMLP` holding the *same* gate/up/
down submodules (so parameter names, adapters and checkpoints are unchanged), and only after checking on
a probe input that the swap computes exactly what the original module did; other MLPs are left alone.
On CUDA with triton installed the SwiGLU runs as the Triton kernel (lorafit.ops.swiglu).

`FusedRMSNorm`: an RMSNorm (Llama, Mistral, Qwen; Gemma's (1 + w) variant) as one Triton kernel each
way (lorafit.ops.triton.rmsnorm), where the module computes it in about six elementwise passes forward
and more backward, keeping fp32 intermediates. `fuse_rmsnorms(model)` swaps a norm only where the
kernel runs (CUDA with triton; the interpreter in tests) and only after a probe input shows the same
output to rounding: the kernel sums the squares in another order, so it is close, not bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.device import triton_available
from lorafit.modules import set_submodule
from lorafit.ops.swiglu import swiglu


class recompute_saved(torch.autograd.graph.saved_tensors_hooks):
    """While active, any tensor saved for backward that is (a view of) `target` is stored as a marker
    and rebuilt with `recompute()` when backward needs it; everything else is saved as usual."""

    def __init__(self, target: torch.Tensor, recompute: Callable[[], torch.Tensor]) -> None:
        # plain values only: a reference to `target` here would keep it alive until backward
        key = (target.untyped_storage().data_ptr(), target.device, target.dtype)

        def pack(t: torch.Tensor):
            if (t.untyped_storage().data_ptr(), t.device, t.dtype) == key:
                return (_RECOMPUTE, t.shape, t.stride(), t.storage_offset())
            return t

        def unpack(packed):
            if isinstance(packed, tuple) and packed[0] is _RECOMPUTE:
                _, shape, stride, offset = packed
                return recompute().as_strided(shape, stride, offset)
            return packed

        super().__init__(pack, unpack)


_RECOMPUTE = object()


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with the memory behaviour of the module docstring.

    Holds the original gate_proj / up_proj / down_proj modules (plain, quantized or LoRA-wrapped)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if not torch.is_grad_enabled():
            return self.down_proj(F.silu(g) * u)
        a = swiglu(g, u)
        if _outer_hooks_active():  # someone else (e.g. torch.utils.checkpoint) manages saved tensors
            return self.down_proj(a)
        with recompute_saved(a, lambda: F.silu(g.detach()) * u.detach()):
            return self.down_proj(a)


def _outer_hooks_active() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError):  # private API moved: assume hooks are active and stay plain
        return True


def fuse_gated_mlps(model: nn.Module) -> int:
    """Swap every SiLU-gated MLP of `model` for a `GatedMLP` over the same submodules; returns how many.

    An MLP qualifies when it has gate_proj, up_proj and down_proj children and its output on a probe
    input equals `GatedMLP`'s bit for bit (so Gemma's GELU MLP, or any MLP that does more, stays)."""
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, GatedMLP) or not all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            continue
        fused = GatedMLP(module.gate_proj, module.up_proj, module.down_proj)
        if _same_output(module, fused):
            swaps.append((name, fused))
    for name, fused in swaps:
        set_submodule(model, name, fused)
    return len(swaps)


@torch.no_grad()
def _same_output(module: nn.Module, fused: GatedMLP) -> bool:
    """Compare on a small random input in eval mode (no dropout), restoring the training flags."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        in_features = getattr(fused.gate_proj, "in_features", None)
        base = [t for n, t in module.named_parameters() if "lora_" not in n and t.is_floating_point()]
        device = next((t.device for t in module.parameters()), None)
        if in_features is None or device is None:
            return False
        dtype = base[0].dtype if base else torch.float32  # a quantized base computes in fp32 on CPU
        gen = torch.Generator().manual_seed(0)  # drawn on the host, the same probe for every device
        x = torch.randn(2, 3, in_features, generator=gen, device="cpu").to(device, dtype)
        try:
            return torch.equal(module(x), fused(x))
        except Exception:  # an MLP with another signature: not ours to swap
            return False
    finally:
        for m, mode in modes.items():
            m.train(mode)


class FusedRMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * (weight + offset), forward and backward in one Triton kernel
    each. Holds the original norm's weight Parameter (same name, same storage)."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: float) -> None:
        super().__init__()
        self.weight, self.eps, self.offset = weight, float(eps), float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lorafit.ops.triton.rmsnorm import rmsnorm

        return rmsnorm(x, self.weight, self.eps, self.offset)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"


def rmsnorm_kernel_runs(device: torch.device) -> bool:
    """Whether the Triton RMSNorm runs on `device`: CUDA with triton, or the CPU under TRITON_INTERPRET=1."""
    import os

    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


def fuse_rmsnorms(model: nn.Module) -> int:
    """Swap every RMSNorm of `model` for a `FusedRMSNorm` where the kernel runs; returns how many.

    A norm qualifies when its class name ends in "RMSNorm", it has a 1-D `weight` and an epsilon
    (`variance_epsilon` or `eps`), and on a probe input the kernel's output matches the module's with
    offset 0 (w) or 1 (Gemma's 1 + w) to the dtype's rounding."""
    swaps = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if (not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, nn.Parameter)
                or weight.dim() != 1 or eps is None or not rmsnorm_kernel_runs(weight.device)):
            continue
        for offset in (0.0, 1.0):
            fused = FusedRMSNorm(weight, eps, offset)
            if _close_output(module, fused, weight):
                swaps.append((name, fused))
                break
    for name, fused in swaps:
        set_submodule(model, name, fused)
    return len(swaps)


@torch.no_grad()
def _close_output(module: nn.Module, fused: FusedRMSNorm, weight: torch.Tensor) -> bool:
    gen = torch.Generator().manual_seed(0)  # drawn on the host, the same probe for every device
    x = torch.randn(4, weight.shape[0], generator=gen, device="cpu").to(weight.device, weight.dtype)
    try:
        expected, got = module(x), fused(x)
    except Exception:  # a norm with another signature: not ours to swap
        return False
    tol = 1e-5 if weight.dtype == torch.float32 else 2e-2
    scale = expected.float().abs().max().clamp_min(1e-6)
    return expected.shape == got.shape and bool(((expected.float() - got.float()).abs().max() / scale) <= tol)

