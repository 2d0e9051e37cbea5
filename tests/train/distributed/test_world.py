"""Processes that fail together: a rank that raises stops the run with its error, a rank killed with a
real signal makes the other exit non-zero (gloo, collective timeout), and the last complete
checkpoint of the killed run resumes."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.train.distributed.world import SINGLE, World, init_world, launched_size, rank_device
from lorafit.train.state_files import load_state
from lorafit.train.trainer import Trainer, latest_checkpoint
from tests.train.distributed import kit

TIMEOUT = 12.0  # the workers' collective_timeout in the signal tests (above a step and a save on a busy 2-core machine)


def test_a_rank_that_raises_stops_every_rank_with_its_error(two_ranks):
    assert two_ranks.returncode != 0
    assert "RuntimeError: rank 1 fails on purpose in its second step" in two_ranks.output
    root_cause = two_ranks.output.split("Root Cause")[-1]
    assert "rank      : 1" in root_cause and "rank 1 fails on purpose" in root_cause


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_a_rank_stopped_by_a_signal_stops_the_other_and_the_last_checkpoint_resumes(
        dist_data, tokenizer, dist_samples, tmp_path, signum):
    """Two bare processes (no torchrun agent to stop the survivor) train and checkpoint every step;
    a real signal hits rank 1 mid-run. Killed, its connections close and rank 0 fails in its next
    collective; stopped (a hung process: its connections stay open), rank 0 fails when the collective
    timeout expires. Either way rank 0 exits non-zero instead of hanging."""
    port = str(kit.free_port())
    checkpoints = tmp_path / "long" / "checkpoints"
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(tmp_path / f"rank{r}.log", "w")) for r in range(2)]
        procs = [subprocess.Popen([sys.executable, str(kit.WORKER), str(dist_data), str(tmp_path), f"long={TIMEOUT}"],
                                  cwd=kit.ROOT, stdout=logs[r], stderr=subprocess.STDOUT,
                                  env=kit.worker_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                     LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for r in range(2)]
        try:
            deadline = time.monotonic() + 300
            while len(list(checkpoints.glob("step-*"))) < 2 and all(p.poll() is None for p in procs):
                assert time.monotonic() < deadline, "the 2-process run wrote no checkpoints"
                time.sleep(0.2)
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()[-3000:]
            time.sleep(0.3)  # somewhere inside a later step or save
            procs[1].send_signal(signum)
            status = procs[0].wait(timeout=TIMEOUT + 60)  # a hang guard, not a timing: it must not wait for ever
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    assert status != 0, (tmp_path / "rank0.log").read_text()[-3000:]
    if signum == signal.SIGSTOP:
        assert f"Timed out waiting {int(TIMEOUT * 1000)}ms" in (tmp_path / "rank0.log").read_text()
    checkpoint = latest_checkpoint(tmp_path / "long")
    step = load_state(checkpoint)["step"]
    assert step >= 1
    # the survivor's last checkpoint resumes (here on one process: FSDP's shards were saved whole)
    history = Trainer(kit.config(tmp_path / "long", max_steps=step + 2), kit.tiny_llama(quant="nf4"), tokenizer,
                      dist_samples.train).train(resume=True)
    assert [h["step"] for h in history] == list(range(1, step + 3))
    assert all(math.isfinite(h["loss"]) for h in history)


def test_one_process_is_the_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_size() == 1 and init_world("cpu") is SINGLE
    assert SINGLE.sum([1.5, 2]) == [1.5, 2] and SINGLE.broadcast("x") == "x" and SINGLE.gather(3) == [3]
    assert SINGLE.scatter([7]) == 7 and SINGLE.is_main and not SINGLE.distributed
    assert World(rank=1, size=2).is_main is False


def test_each_rank_takes_its_own_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cpu") == torch.device("cpu")
    with pytest.raises(LorafitError, match="each one uses cuda:LOCAL_RANK; use --device cuda"):
        rank_device("cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(LorafitError, match="WORLD_SIZE='two' is not a number"):
        launched_size()


@pytest.mark.gpu
def test_a_rank_on_cuda_uses_its_local_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert rank_device("cuda") == torch.device("cuda", 0)
    assert rank_device("auto") == torch.device("cuda", 0)
    assert os.environ["LOCAL_RANK"] == "0"
