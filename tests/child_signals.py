"""For tests that send Ctrl-C (SIGINT) to a worker they started."""

from __future__ import annotations

import signal


def interruptible() -> None:
    """``Popen(preexec_fn=...)``: the child acts on SIGINT even when this test run ignores it.
    A job a non-interactive shell starts in the background ignores SIGINT; its children inherit
    that, and Python then keeps ignoring it (measured: both Ctrl-C tests failed, the worker
    running on, when the suite was started that way)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
