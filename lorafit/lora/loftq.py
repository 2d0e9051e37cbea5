"""LoftQ initialisation for QLoRA (Li et al. 2023): quantize so that deq(Q) + s·BA starts near W.

Plain QLoRA starts from deq(NF4(W)) + s·BA with B = 0: the whole quantization error W - deq(Q) is
there at step 0 and training must first learn it back. LoftQ picks Q and the adapter together,
alternating (Algorithm 1 of the paper, T = `loftq_iter` rounds, A = B = 0 before the first):

    Q_t       = NF4(W - s·B_{t-1} A_{t-1})                 quantize what the adapter does not hold
    s·B_t A_t = SVD_r(W - deq(Q_t))                        best rank-r fit of what Q misses

with the singular values split evenly between the factors, A = sqrt(S/s)·Vh, B = U·sqrt(S/s) (as PiSSA
does). Round 1 alone already has error ||W - deq(Q) - s·BA||_F = sqrt(sum_{i>r} S_i^2), below plain NF4's
||W - deq(Q)||_F unless that residual has rank <= r; later rounds usually lower it further, and the
round with the lowest error is the one kept (the error of each round is read off its SVD, no extra
work). The base then holds Q: the layer's frozen `nn.Linear` is replaced by an `NF4Linear` of those
codes, so the adapted model is a QLoRA model whose start is closer to the full-precision one.

Only unquantized `nn.Linear` bases qualify: LoftQ needs W itself (apply it to a model loaded without
`quantize`; the layers it adapts become NF4, quantize the rest as usual afterwards).
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.quant.linear import NF4Linear
from lorafit.quant.nf4 import NF4Tensor, quantize_nf4


def check_loftq_target(path: str, base: nn.Module) -> None:
    """LorafitError unless `base` (the module at `path`) is a full-precision nn.Linear."""
    if type(base) is not nn.Linear:
        raise LorafitError(f"init='loftq' needs full-precision nn.Linear layers to quantize, but {path} is a "
                           f"{type(base).__name__}; load the model without quantize (LoftQ makes the adapted "
                           "layers NF4) and leave embeddings / Conv1D out of target_modules")


@torch.no_grad()
def loftq_init(W: torch.Tensor, r: int, scaling: float, n_iter: int = 1, blocksize: int = 64,
               double_quant: bool = True) -> tuple[NF4Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """(Q, A (r, in), B (out, r), relative error of each round) for weight W (out, in), fp32 math.

    Q is the round with the lowest ||W - (deq(Q) + s·BA)||_F / ||W||_F (the list holds every round's)."""
    W = W.detach().float()
    norm = torch.linalg.matrix_norm(W)
    A = torch.zeros(r, W.shape[1], dtype=W.dtype, device=W.device)
    B = torch.zeros(W.shape[0], r, dtype=W.dtype, device=W.device)
    errors, best = [], None
    for _ in range(n_iter):
        Q = quantize_nf4(W - scaling * (B @ A), blocksize=blocksize, double_quant=double_quant)
        U, sigma, Vh = torch.linalg.svd(W - Q.dequantize(torch.float32), full_matrices=False)
        root = (sigma[:r] / scaling).sqrt()
        A, B = root[:, None] * Vh[:r], U[:, :r] * root[None, :]  # (r, in), (out, r)
        errors.append(float(torch.linalg.vector_norm(sigma[r:]) / norm))
        if best is None or errors[-1] < best[0]:
            best = (errors[-1], Q, A, B)
    _, Q, A, B = best
    return Q, A, B, errors


def loftq_layer(base: nn.Linear, r: int, scaling: float, n_iter: int) -> tuple[NF4Linear, torch.Tensor, torch.Tensor]:
    """The NF4 replacement of `base` and the adapter's (A, B) LoftQ pairs with it."""
    Q, A, B, _ = loftq_init(base.weight, r, scaling, n_iter)
    Q.dtype = base.weight.dtype  # the dtype the weight had (the codes are the same for any)
    quantized = NF4Linear.from_nf4(Q, base.bias.data if base.bias is not None else None)
    return quantized, A, B
