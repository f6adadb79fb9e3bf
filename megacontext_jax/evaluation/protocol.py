"""The evaluation protocol: what is measured, on which text, and in what order (DESIGN section 8).

``evaluate`` runs it on a model and held-out documents and returns the results as one dict
(``eval.json``): per history length, each condition's NLL on windows drawn across the documents
(``windows``), on all scored tokens and on the key tokens, with the paired differences
(``text``); the budget curve and the effective window (``text.budget_curve``); retrieval per
task, length, needle depth and LOD (``retrieval``); and the substitutability of gists.
"""

import dataclasses
import hashlib
import platform
import time

import flax
import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from megacontext_jax.config import to_json
from megacontext_jax.data import pipeline as data
from megacontext_jax.data.tokenizer import tokenizer_for
from megacontext_jax.evaluation import windows
from megacontext_jax.evaluation.retrieval import TASKS, retrieval
from megacontext_jax.evaluation.scoring import Setting
from megacontext_jax.evaluation.text import (
    budget_curve,
    score_sequences,
    substitutability,
    text_row,
)
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.nets.decoder import DecoderLM


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The evaluation's arguments: the CLI's flags and the Python API's keywords.

    Lengths are multiples of the trained budget W; ``budgets`` are absolute entry counts.
    """

    lengths: tuple[int, ...] = (4, 8, 16)
    # Windows per length. At 8 W the paired SE of mc_static - window is ~0.004 nats with 512
    # windows on the default split (see the closing note of the evaluation issue).
    windows: int = 512
    stride: int = 0  # tokens between the starts of candidate windows (0: W)
    key_threshold: float = 0.5  # nats by which full beats window on a key token
    budgets: tuple[int, ...] = (32, 64, 128, 256)
    budget_length: int = 8  # the history length of the budget curve, in multiples of W
    # Longer ones cost most of all (full attends densely over 2K and 4K tokens: one 64 W task
    # ran over 3 minutes on 2 busy cores): ask for them, --retrieval-lengths 4,8,16,32,64.
    retrieval_lengths: tuple[int, ...] = (4, 8, 16)
    tasks: tuple[str, ...] = tuple(TASKS)
    probes: int = 32  # per task and length
    batch: int = 8
    refocus_steps: int = 4
    seed: int = 0

    @classmethod
    def quick(cls, **fields) -> "Protocol":
        """A one-minute look: two lengths, few windows and probes, three budgets."""
        quick = dict(
            lengths=(4, 8),
            windows=48,
            budgets=(32, 64, 128),
            retrieval_lengths=(4, 8),
            probes=8,
        )
        return cls(**(quick | fields))

    def validate(self) -> None:
        """``ValueError`` (one line) naming the first argument that is wrong."""
        checks = (
            ("lengths", self.lengths and min(self.lengths) >= 1, "positive multiples of W"),
            ("retrieval_lengths", min(self.retrieval_lengths, default=1) >= 1, "positive"),
            ("windows", self.windows >= 2, "at least 2 (a paired SE needs two)"),
            ("stride", self.stride >= 0, ">= 0 (0: W)"),
            ("key_threshold", self.key_threshold >= 0, ">= 0 nats"),
            ("budgets", min(self.budgets, default=1) >= 1, "positive entry counts"),
            ("budget_length", self.budget_length >= 1, "a positive multiple of W"),
            ("probes", self.probes >= 1, "at least 1"),
            ("batch", self.batch >= 1, "at least 1"),
            ("refocus_steps", self.refocus_steps >= 0, ">= 0"),
            ("seed", self.seed >= 0, ">= 0"),
        )
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown retrieval task {unknown[0]!r}; known: {', '.join(TASKS)}")


def evaluate(
    model: MegaContext | DecoderLM,
    config: ml_collections.ConfigDict,
    docs: list[data.Document],
    protocol: Protocol,
    progress: bool = True,
) -> dict:
    """The results of ``protocol`` for ``model`` (trained with ``config``) on the held-out
    documents ``docs`` (the tokenizer's ids)."""
    protocol.validate()
    setting = Setting.from_config(config)
    p, w = protocol, setting.layout.capacity
    tokenizer = tokenizer_for(config.model)
    filler = np.concatenate([d.data.astype(np.int32) for d in docs])
    # Bits per byte: bits per token over the held-out text's bytes per token (1 for bytes).
    per_token = float(tokenizer.token_bytes()[filler].mean())
    lengths = sorted(set(p.lengths) | ({p.budget_length} if p.budgets else set()))
    steps = len(lengths) + bool(p.budgets) + len(p.tasks) * len(p.retrieval_lengths)
    bar = tqdm(total=steps, desc="evaluation", leave=False, disable=not progress)
    results: dict = {"text": {}, "retrieval": {t: {} for t in p.tasks}}
    scored: dict[int, tuple] = {}
    for m in lengths:
        bar.set_postfix_str(f"text {m}W")
        seqs, doc_of = _windows(docs, m * w, p.stride or w, p, setting.bos)
        rng = np.random.default_rng([p.seed, m])
        nll = score_sequences(model, setting, seqs, p.batch, p.refocus_steps, rng)
        scored[m] = (seqs, doc_of, nll)
        if m in p.lengths:
            results["text"][f"{m}W"] = text_row(nll, doc_of, per_token, p.key_threshold, p.seed)
        bar.update()
    if p.budgets:
        bar.set_postfix_str(f"budgets at {p.budget_length}W")
        seqs, doc_of, nll = scored[p.budget_length]
        results["budget"] = {"length": f"{p.budget_length}W"} | budget_curve(
            model, setting, seqs, doc_of, p.budgets, nll, p.batch, p.refocus_steps, p.seed
        )
        bar.update()
    for task in p.tasks:
        for m in p.retrieval_lengths:
            bar.set_postfix_str(f"{task} {m}W")
            rng = np.random.default_rng([p.seed, m, list(TASKS).index(task)])
            results["retrieval"][task][f"{m}W"] = retrieval(
                model,
                setting,
                task,
                filler,
                m * w,
                p.probes,
                p.batch,
                p.refocus_steps,
                tokenizer,
                rng,
            )
            bar.update()
    bar.close()
    if isinstance(model, MegaContext) and setting.layout.max_level >= 2:
        results["substitutability"] = substitutability(model, setting, docs, 64)
    return results


def _windows(
    docs: list[data.Document], n: int, stride: int, protocol: Protocol, bos: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """The windows of history ``n`` (``windows.draw``) as token sequences, and their documents."""
    drawn = windows.draw([len(d.data) for d in docs], n, protocol.windows, stride, protocol.seed)
    if not drawn:
        raise ValueError(f"no held-out document has {n} tokens for a window of that history")
    seqs = [windows.tokens(docs, x, n, bos) for x in drawn]
    return seqs, np.array([x.doc for x in drawn])


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A short, stable fingerprint of a run's whole config (which run a result belongs to)."""
    return hashlib.sha256(to_json(config).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    """What a result was computed with: the package, Python, JAX, Flax, NumPy and the device."""
    import megacontext_jax

    return {
        "megacontext_jax": megacontext_jax.__version__,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }


def provenance(
    config: ml_collections.ConfigDict, protocol: Protocol, started: float, **run: object
) -> dict:
    """What produced a result: ``run`` (checkpoint, step, ...), the config's hash, the
    protocol's arguments, the versions, and the seconds since ``started``."""
    return run | {
        "config_hash": config_hash(config),
        "arguments": dataclasses.asdict(protocol),
        "versions": versions(),
        "seconds": round(time.perf_counter() - started, 1),
    }
