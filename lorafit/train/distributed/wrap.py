"""How the trainer's model runs on the processes of a run: as it is (one process), DDP or FSDP2.

DDP and FSDP both wrap a `StepModule`, whose forward is the trainer's loss of one batch, so that the
wrapper's hooks see every forward (the loss reads the LM head's weight directly, outside the head's
own forward: lorafit.ops.chunked_loss).

    ddp    `torch.nn.parallel.DistributedDataParallel`: every rank holds the whole model; the adapter
           gradients are all-reduced (averaged) in buckets during the backward of the last micro-batch
           of a step (`accumulating`: `no_sync` for the others). The frozen base is communicated once,
           when DDP starts (rank 0's parameters and buffers are broadcast), never during training.
    fsdp   FSDP2, `torch.distributed.fsdp.fully_shard` on every decoder block, then on the StepModule
           (the root: embeddings, final norm, LM head). Each parameter, frozen base and adapter alike,
           is kept as a DTensor holding 1/N of its rows (dim 0, padded). Before a block runs, its
           parameters are all-gathered, and freed after its forward and again after its backward;
           the adapter gradients are reduce-scattered (averaged), so each rank keeps, clips (over
           all shards: clip_grad_norm_ on DTensors) and updates 1/N of the adapter and of its AdamW
           states. A quantized base is sharded like any other: the packed storage of its NF4 or
           ternary linears (codes, block statistics, double-quant statistics; ternary codes and
           scales) becomes frozen Parameters first (`PackedLinear.storage_as_parameters`, codes and
           statistics of the same rows in the same shard), so a rank holds ~1/N of it.
           FSDP2 keeps the root gathered from its forward to the end of the backward.

Saving and loading see whole tensors whatever the strategy:

    full_params()       the trainable parameters as whole tensors on every rank, in place of the
                        shards, for `save_adapter` / `set_adapter_state`; with write_back=True rank
                        0's values are sent back into every rank's shard (or replica) on exit
    optimizer_state()   the AdamW states gathered to rank 0, keyed by parameter name
                        (torch.distributed.checkpoint.state_dict, full_state_dict=True), so a run
                        resumes on another world size or strategy; one process keeps
                        `optimizer.state_dict()` (keyed by position), and either form loads in both
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lorafit.errors import LorafitError
from lorafit.quant.linear import PackedLinear
from lorafit.train.distributed.world import World

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], object]


class StepModule(nn.Module):
    """forward(batch) = loss_fn(model, batch) (the objective's loss): the module DDP and FSDP wrap (the
    model is its child `model`, so its own parameters keep their names under it). forward(batch, fn)
    runs another function of the model the same way (an evaluation or a reference pass)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor], fn: Callable | None = None):
        return (fn or self.loss_fn)(self.model, batch)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: transformers' `_no_split_modules` classes (e.g.
    LlamaDecoderLayer), else the members of the model's longest nn.ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise LorafitError(f"distributed: fsdp found no decoder blocks in {type(model).__name__} to shard; "
                           "use distributed: ddp")
    return list(max(lists, key=len))


def local_bytes(module: nn.Module, trainable: bool = False) -> int:
    """Bytes of the parameters that train (trainable=True) or of the frozen parameters and buffers
    (False) that this rank holds itself: a DTensor counts its local shard only."""
    tensors = [p for p in module.parameters() if p.requires_grad == trainable]
    if not trainable:
        tensors += list(module.buffers())
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # DTensor: its shard
    return sum(t.numel() * t.element_size() for t in local)


class Parallel:
    """The model on `world` under `strategy` ("single", "ddp" or "fsdp"); see the module docstring."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, world: World, strategy: str) -> None:
        if strategy not in ("single", "ddp", "fsdp"):
            raise LorafitError(f"distributed strategy {strategy!r} is unknown; use ddp or fsdp")
        if strategy != "single" and not world.distributed:
            strategy = "single"
        self.model, self.world, self.strategy = model, world, strategy
        self.step = StepModule(model, loss_fn)
        self.runner: nn.Module = self.step
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [world.device.index] if world.device.type == "cuda" else None
            self.runner = DistributedDataParallel(self.step, device_ids=ids, forward_sync_buffers=False,
                                                  gradient_as_bucket_view=True)
        elif strategy == "fsdp":
            self.runner = _shard(self.step, model, world)

    def loss(self, batch: dict[str, torch.Tensor]):
        """The loss function of this rank's batch, through the wrapper (the objective's (loss sum, metrics))."""
        return self.runner(batch)

    def call(self, fn: LossFn, batch: dict[str, torch.Tensor]):
        """fn(model, batch) through the wrapper, on every rank (FSDP gathers what the forward needs):
        forwards without backward (an evaluation, a reference pass before training); call `after_eval`
        afterwards."""
        return self.runner(batch, fn)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Around the forward and backward of one micro-batch: DDP all-reduces the gradients only in
        the last one of an optimizer step. (FSDP reduce-scatters after each: the sharded gradients
        accumulate, and the unsharded ones of the whole adapter never exist at once.)"""
        if self.strategy == "ddp" and not last:
            return self.runner.no_sync()
        return contextlib.nullcontext()

    def after_eval(self) -> None:
        """Free the root's gathered parameters after forward passes without backward (evaluation)."""
        if self.strategy == "fsdp":
            self.runner.reshard()

    @contextlib.contextmanager
    def full_params(self, write_back: bool = False) -> Iterator[None]:
        """Inside, every trainable parameter of the model is whole on every rank (see the module
        docstring). All ranks must enter; with write_back, rank 0's values win on a normal exit."""
        slots = [(m, n, p) for m in self.model.modules() for n, p in m.named_parameters(recurse=False)
                 if p.requires_grad]
        if self.strategy == "single":
            yield
            return
        if self.strategy == "ddp":
            yield
            if write_back:
                with torch.no_grad():
                    for _, _, p in slots:
                        dist.broadcast(p.data, src=0)
            return
        with torch.no_grad():  # the same parameters in the same order on every rank: the all-gathers pair up
            whole = [nn.Parameter(p.full_tensor(), requires_grad=True) for _, _, p in slots]
        for (module, name, _), full in zip(slots, whole):
            setattr(module, name, full)
        try:
            yield
        finally:
            for module, name, p in slots:
                setattr(module, name, p)
        if write_back:
            from torch.distributed.tensor import distribute_tensor

            with torch.no_grad():
                for (_, _, p), full in zip(slots, whole):
                    p.to_local().copy_(distribute_tensor(full.data, p.device_mesh, p.placements,
                                                         src_data_rank=0).to_local())

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer's state on rank 0 (None on the others); every rank must call it. One process:
        `optimizer.state_dict()`, as lorafit always saved it (keyed by position). Several: whole and on
        the host, keyed by parameter name (torch.distributed.checkpoint.state_dict, gathered)."""
        if self.strategy == "single":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.world.is_main else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
        """Load what `optimizer_state` returned, by this or another number of processes (rank 0
        passes it, the others None; it is broadcast and each rank keeps its shard)."""
        if self.strategy == "single":
            optimizer.load_state_dict(index_keyed(state, optimizer, self.model))
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if self.world.is_main:
            state = name_keyed(state, optimizer, self.model)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(self.model, optimizer, state if self.world.is_main else {}, options=options)


def _param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The names in `model` of the optimizer's parameters, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def name_keyed(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """An `optimizer.state_dict()` (states keyed by position in the param groups) keyed by the
    parameters' names in `model` instead, as torch.distributed.checkpoint.state_dict keys them."""
    if not any(isinstance(k, int) for k in state.get("state", {})):
        return state
    order = _param_names(optimizer, model)
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def index_keyed(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """The reverse of `name_keyed`: a state keyed by parameter name as `optimizer.load_state_dict` takes it."""
    if not any(isinstance(k, str) for k in state.get("state", {})):
        return state
    position = {name: i for i, name in enumerate(_param_names(optimizer, model))}
    groups = [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {position[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _shard(step: StepModule, model: nn.Module, world: World) -> nn.Module:
    """FSDP2 on every decoder block and on the StepModule, on a 1-D mesh of all ranks."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for module in model.modules():
        if isinstance(module, PackedLinear):  # NF4 and ternary bases: their packed storage is sharded too
            module.storage_as_parameters()
    # the default group itself (init_device_mesh may open a new group, without the run's collective timeout)
    mesh = DeviceMesh.from_group(dist.group.WORLD, world.device.type)
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # one dtype for all reduced gradients
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(step, mesh=mesh, mp_policy=policy)
