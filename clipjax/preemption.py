"""Stop requests: SIGTERM or Ctrl-C asks the loop to save the current step and exit cleanly.

One process: a signal handler sets a flag the loop reads after each step.

Several processes: a pod's scheduler may signal only some hosts, and hosts that
decide to save at different steps deadlock in the collectives. JAX's preemption
sync manager (started by ``jax.distributed.initialize``) catches SIGTERM in C++,
tells every process through the coordination service, and picks the one step all
of them will reach next; ``reached_preemption_sync_point(step)`` is True on every
process at that same step. A Python SIGTERM handler would replace JAX's, so none
is installed there; Ctrl-C re-sends itself as SIGTERM to reach it.

The first Ctrl-C restores the default action, so a second one ends the process at
once, without saving.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger("clipjax")


def _pod_sync_available() -> bool:
    from clipjax.distributed import coordination_state  # the preemption sync manager has no public accessor

    return jax.process_count() > 1 and coordination_state().preemption_sync_manager is not None


class StopRequest:
    """Watches SIGTERM and SIGINT; ``at(step)`` says whether to save ``step`` and stop."""

    def __init__(self, start_step: int) -> None:
        self.signal_name: str | None = None
        self._event = threading.Event()
        self._pod = _pod_sync_available()
        self._installed: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread; an embedding caller keeps its own handlers
        if not self._pod:
            self._install(signal.SIGTERM, self._on_sigterm)
        # Respect an inherited "ignore" (nohup, background jobs of a script): only replace Python's default.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._install(signal.SIGINT, self._on_sigint)
        if self._pod:
            # Counts this process in from the first step, so a notice during compilation stops at start + 1.
            multihost_utils.reached_preemption_sync_point(start_step)

    def _install(self, signum: int, handler) -> None:
        self._installed[signum] = signal.signal(signum, handler)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.signal_name = self.signal_name or "SIGTERM"
        self._event.set()

    def _on_sigint(self, signum, frame) -> None:
        del frame
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C aborts at once
        self.signal_name = self.signal_name or "SIGINT"
        log.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again aborts without saving)")
        if self._pod:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler spreads the notice to every process
        else:
            self._event.set()
        del signum

    def at(self, step: int) -> bool:
        """True when the loop should save ``step`` and stop (the same step on every process)."""
        if self._pod:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._event.is_set()

    def close(self) -> None:
        """Puts back the handlers found at construction."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._installed.items():
            signal.signal(signum, previous)
        self._installed.clear()
