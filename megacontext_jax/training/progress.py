"""What a training run prints: the start-up block, and one progress bar per phase.

A run has up to two phases, each with its own objective: the curriculum (the base model alone, a
plain LM loss) and the main phase (a plain LM loss, or with ``mc.enabled`` the MegaContext
objective). Each phase gets its own bar, so its ETA is its own; the bar starts once the phase's
first step has compiled and run, and tokens/s counts only the time spent in steps (not
compilation, validation or checkpoints). Metric names and units: ``metrics.py``.
"""

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jax
from tqdm import tqdm


@dataclass(frozen=True)
class Phase:
    name: str  # the metrics prefix: "curriculum", "train" (a plain LM) or "mc"
    first: int  # steps first..last (1-based, inclusive)
    last: int
    batch_size: int
    seq_len: int
    what: str  # one line: what trains on what

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


class PhaseBar:
    """The progress bar of one phase, updated every step.

    ``started(step)`` is called once that step's outputs are ready: the bar (and the tokens/s
    clock) starts there, so neither counts the compilation of the phase's step.
    """

    def __init__(self, phase: Phase, enabled: bool):
        self.phase, self.enabled = phase, enabled
        self.bar: tqdm | None = None
        self._clock = 0.0
        self._timed_steps = 0

    def started(self, step: int) -> None:
        self.bar = tqdm(
            total=self.phase.last - self.phase.first + 1,
            initial=step - self.phase.first + 1,
            desc=self.phase.name,
            unit="step",
            dynamic_ncols=True,
            disable=not self.enabled,
        )
        self._clock = time.perf_counter()
        self._timed_steps = 0

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self._timed_steps += 1

    def tokens_per_s(self) -> float | None:
        """Tokens per second over the steps since the bar started (None before there are any)."""
        if not self._timed_steps:
            return None
        return self._timed_steps * self.phase.tokens_per_step / (time.perf_counter() - self._clock)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stops the tokens/s clock inside the block (validation, checkpoints)."""
        paused_at = time.perf_counter()
        try:
            yield
        finally:
            self._clock += time.perf_counter() - paused_at

    def show(self, **values: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=True)

    def write(self, text: str) -> None:
        (self.bar.write if self.bar is not None else tqdm.write)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def startup_block(
    *,
    workdir: str,
    resumed_from: int | None,
    reused: str | None = None,
    mesh: jax.sharding.Mesh,
    params: dict[str, int],
    phases: list[Phase],
    config_source: str,
    diff: dict[str, tuple[object, object]],
) -> str:
    """The block a run prints before its first step: where it writes, on what, how big, what
    each phase trains, and how its config differs from the config file's defaults. ``reused``:
    the workdir whose curriculum a new run starts from (``curriculum.reuse_from``)."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    run = "new run" if resumed_from is None else f"resuming from step {resumed_from}"
    if reused is not None:
        run = f"new run from the curriculum of {reused}"
    lines = [
        f"workdir   {workdir} ({run}; metrics.jsonl, tb/, loss.png, checkpoints/)",
        f"devices   {len(devices)} x {', '.join(kinds)} on {jax.process_count()} process(es); "
        f"mesh {dict(mesh.shape)}",
        "params    "
        + "  ".join(f"{part} {_millions(n)}" for part, n in params.items())
        + (f"  (total {_millions(sum(params.values()))})" if len(params) > 1 else ""),
    ]
    for i, p in enumerate(phases):
        lines.append(
            f"{'phases' if i == 0 else '':<9} {p.name}: steps {p.first}-{p.last}, "
            f"{p.batch_size} x {p.seq_len} = {p.tokens_per_step:,} tokens/step; {p.what}"
        )
    if diff:
        lines.append(f"config    {config_source}, changed:")
        lines += [f"            {k} = {new!r} (default {old!r})" for k, (old, new) in diff.items()]
    else:
        lines.append(f"config    {config_source} as it is")
    return "\n".join(lines)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"
