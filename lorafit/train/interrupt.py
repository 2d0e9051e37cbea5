"""Ctrl-C during training: finish the step, write a checkpoint, stop.

A SIGINT in the middle of an optimizer step would leave the adapter half updated (AdamW writes its
parameters in several kernels) and the run with no checkpoint when `save_steps` is unset. So while the
Trainer's loop runs, the first Ctrl-C is only noted (`StopRequest.requested`): the loop ends the current
step, writes a checkpoint as every other one is written (whole or absent) and raises KeyboardInterrupt;
`--resume` then continues as if nothing had happened. A second Ctrl-C raises KeyboardInterrupt at once.

Only the main thread can handle signals, and a handler someone else installed is left alone: there
(and in other threads) Ctrl-C keeps Python's default behaviour.
"""

from __future__ import annotations

import os
import signal
import threading


class StopRequest:
    """While entered, SIGINT sets `requested` (the first time) instead of raising KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write: a handler may run while a progress bar is half way through a buffered write to stderr
        os.write(2, b"\nlorafit: interrupted: finishing this step and writing a checkpoint "
                    b"(Ctrl-C again stops at once)\n")
