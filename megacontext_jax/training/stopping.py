"""Stop requests of a training run: SIGINT, and SIGTERM (a scheduler's preemption notice).

During start-up nothing is at stake, so a request stops the run at once, even in the middle of a
compilation (``Stop.wait_for`` runs it in a worker thread). Once training, the run stops between
steps and saves; across processes all hosts stop before the same step (JAX's preemption sync
point).
"""

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

import jax
from jax.experimental import multihost_utils

T = TypeVar("T")
STARTUP_THREAD = "train-start-up"


def startup_running() -> bool:
    """Whether an interrupted start-up's work (a compilation, say) still runs in its thread."""
    return any(t.name == STARTUP_THREAD and t.is_alive() for t in threading.enumerate())


class Stop:
    """Stop requests: SIGINT and SIGTERM (a scheduler's preemption notice) ask the run to stop.

    During start-up nothing new is at stake, so a request stops it at once (``check``), even in
    the middle of a compilation (``wait_for``). Once training, the run stops between steps, where
    the state and the data iterator agree, and saves (``before``); a second SIGINT interrupts at
    once. Across processes JAX's preemption service owns SIGTERM: a notice to any host makes all
    of them stop before the same step (its sync point), so all save the same step; SIGINT there
    interrupts at once, as a lone host cannot stop the others.
    """

    def __init__(self):
        self.requested = threading.Event()
        self.agreed = False  # every process stops before this step: save before leaving

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach main only
            yield self
            return
        single = jax.process_count() == 1

        def handler(signum, frame):
            if not single or (self.requested.is_set() and signum == signal.SIGINT):
                raise KeyboardInterrupt
            self.requested.set()

        signals = (signal.SIGINT, signal.SIGTERM) if single else (signal.SIGINT,)
        previous = {s: signal.signal(s, handler) for s in signals}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def check(self) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt

    def before(self, step: int) -> None:
        """Raises ``KeyboardInterrupt`` if the run is to stop before ``step``."""
        if jax.process_count() > 1:
            self.agreed = multihost_utils.reached_preemption_sync_point(step)
        else:
            self.agreed = self.requested.is_set()
        if self.agreed:
            raise KeyboardInterrupt

    def wait_for(self, fn: Callable[[], T]) -> T:
        """``fn()``, run in a worker thread so that the main thread takes a stop request while
        it runs (XLA compiles, TensorStore and tokenizers read without holding the GIL)."""
        out = {}

        def work():
            try:
                out["value"] = fn()
            except BaseException as e:  # re-raised in the caller's thread
                out["error"] = e

        worker = threading.Thread(target=work, name=STARTUP_THREAD, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
            self.check()
        if "error" in out:
            raise out["error"]
        return out["value"]
