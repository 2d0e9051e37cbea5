"""Training on several processes, GPUs or machines with torch.distributed (torchrun, DDP, FSDP2).

    world      the process group: rank, device, backend (NCCL / gloo), collective timeout
    share      which samples each rank trains on, and the batch-size rules
    wrap       `Parallel`: the model as it is, under DDP, or under FSDP2 (NF4 bases sharded too)
    strategy   `distributed: auto`: DDP when a process fits its device by the estimate, else FSDP
    launch     `lorafit train --nproc-per-node N`: torchrun started for the user
"""
