"""The Python API: load a model, decode text over a persistent memory, evaluate.

    import megacontext_jax as mcj

    model = mcj.load("runs/tiny")  # a training workdir, or a local Hugging Face directory
    with model.session("runs/tiny/memory") as s:  # created if new, continued if not
        s.ingest_text(open("notes.txt").read())
        for piece in s.stream("def main():", max_new_tokens=64, temperature=0.8, top_k=40):
            print(piece, end="", flush=True)
    results = mcj.evaluate(model, quick=True)  # the dict `python -m ...evaluation` writes

Text in, text out; the ``*_ids`` methods take and give token ids. A session holds the memory's
writer lock and commits everything decoded when it is closed, which ``with`` does also on an
exception. ``decode.py`` and ``python -m megacontext_jax.evaluation`` are thin layers over this
module, so the CLIs and a notebook run the same code.
"""

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from megacontext_jax.data.tokenizer import ByteTokenizer, HFTokenizer, sampleable, tokenizer_for
from megacontext_jax.errors import first_line
from megacontext_jax.megacontext import MegaContext
from megacontext_jax.nets.decoder import DecoderLM
from megacontext_jax.runtime.session import Session, SessionError, open_session
from megacontext_jax.runtime.telemetry import Telemetry, plot_lod_map

if TYPE_CHECKING:  # evaluate() imports the evaluation package when it is called
    from megacontext_jax.evaluation import Protocol

Progress = Callable[[int], None]  # called with the number of tokens just ingested


class Model:
    """A loaded model: the network, its config, its tokenizer and where it came from.

    ``module`` is a MegaContext model (base + GistNet + LensNet) or a plain decoder (a GPT trained
    here, or an imported Hugging Face model); only a MegaContext model opens a memory.
    """

    def __init__(
        self,
        module: MegaContext | DecoderLM,
        config: ml_collections.ConfigDict,
        path: Path,
        step: int | None,
    ):
        self.module, self.config, self.path, self.step = module, config, path, step
        self.tokenizer: ByteTokenizer | HFTokenizer = tokenizer_for(config.model)

    def __repr__(self) -> str:
        kind = "MegaContext" if self.is_megacontext else type(self.module).__name__
        at = "" if self.step is None else f" at step {self.step}"
        return f"<megacontext_jax.Model {kind} from {self.path}{at}>"

    @property
    def is_megacontext(self) -> bool:
        return isinstance(self.module, MegaContext)

    @property
    def base(self) -> DecoderLM:
        return self.module.base if isinstance(self.module, MegaContext) else self.module

    @property
    def lens_trained(self) -> bool:
        """Whether LensNet has learned anything (its loss on and past ``mc.lens_start``)."""
        mc = self.config.mc
        return self.step is not None and mc.loss.lens > 0 and self.step > mc.lens_start

    def session(
        self,
        memory: str | Path,
        *,
        telemetry: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> "MemorySession":
        """A decode session over the memory directory ``memory`` (created if new).

        ``telemetry`` appends one record per refocus to ``memory/telemetry/refocus.jsonl`` and
        draws ``lod_map.png`` beside it on close. ``log`` gets notes (e.g. that LensNet is
        untrained and the session keeps the recency pyramid); default: none.
        """
        return MemorySession(self, Path(memory), telemetry=telemetry, log=log or (lambda _: None))

    # -- decoding without a memory: the base model alone --------------------------------------------
    def stream_ids(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Iterator[int]:
        """Ids continuing ``prompt`` with the base model alone (its context capped at the
        training length, ``data.seq_len``); ends at EOS (not yielded) or ``max_new_tokens``."""
        from megacontext_jax.runtime.sampling import generate

        ids = generate(
            self.base,
            np.asarray(prompt, np.int32),
            max_new_tokens,
            allowed=sampleable(self.config.model),
            capacity=self.config.data.seq_len,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        for token in ids:
            if token == self.tokenizer.eos_id:
                return
            yield token

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Text continuing ``prompt`` (base model alone), piece by piece as it is decoded.
        Keyword arguments as ``stream_ids``."""
        prompt_ids = self.tokenizer.encode(_text(prompt, "the prompt"), bos=True)
        yield from _pieces(self.stream_ids(prompt_ids, **sampling), self.tokenizer)

    def generate(self, prompt: str, **sampling: Any) -> str:
        """The whole continuation of ``prompt`` (base model alone) as one string."""
        return "".join(self.stream(prompt, **sampling))


class MemorySession:
    """Decoding over a persistent memory: ingest text, then stream or generate from it.

    Everything ingested is committed at once; decoded tokens join the memory and are committed at
    the end of each ``stream`` / ``generate`` (and by ``close``). Use it as a context manager, or
    call ``close`` (which also releases the memory's writer lock).
    """

    def __init__(
        self, model: Model, memory: Path, *, telemetry: bool, log: Callable[[str], None]
    ) -> None:
        if not model.is_megacontext:
            raise SessionError(
                f"{model.path} holds a plain language model: a memory needs a MegaContext "
                "checkpoint (trained with --config.mc.enabled=true)"
            )
        if not model.lens_trained:
            mc = model.config.mc
            log(
                f"note: LensNet of {model.path} was not trained (step {model.step}, lens loss "
                f"starts at {mc.lens_start}): decoding keeps the recency pyramid, no learned focus"
            )
        self.model, self.memory, self.tokenizer = model, memory, model.tokenizer
        self.telemetry = Telemetry(memory / "telemetry" / "refocus.jsonl") if telemetry else None
        self._session: Session = open_session(
            model.module,
            model.config,
            memory,
            lens_trained=model.lens_trained,
            telemetry=self.telemetry,
        )
        self._closed = False

    def __enter__(self) -> "MemorySession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def num_tokens(self) -> int:
        """Tokens in the memory (decoded ones included)."""
        return self._session.num_tokens

    @property
    def session(self) -> Session:
        """The underlying runtime session (working context, refocus, telemetry records)."""
        return self._session

    def ingest_ids(self, ids: Sequence[int], progress: Progress | None = None) -> None:
        """Appends token ids to the memory and commits them."""
        self._open()
        self._session.ingest(np.asarray(ids, np.int32), progress)

    def encode(self, text: str, *, new_document: bool = False) -> np.ndarray:
        """``text`` as the ids ``ingest_text`` would append: led by BOS when ``new_document`` or
        when the memory is empty."""
        return self.tokenizer.encode(
            _text(text, "the text"), bos=new_document or self.num_tokens == 0
        )

    def ingest_text(
        self, text: str, *, new_document: bool = False, progress: Progress | None = None
    ) -> int:
        """Appends ``text`` to the memory and commits it; returns the number of tokens added."""
        ids = self.encode(text, new_document=new_document)
        self.ingest_ids(ids, progress)
        return len(ids)

    def stream_ids(
        self,
        prompt: Sequence[int] | None = None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Iterator[int]:
        """Ingests ``prompt`` (if any), then yields the decoded ids; ends at EOS (which joins the
        memory but is not yielded) or after ``max_new_tokens``."""
        self._open()
        if prompt is not None and len(prompt):
            self.ingest_ids(prompt)
        eos = self.tokenizer.eos_id
        tokens = self._session.generate(
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=(eos,),
        )
        for token in tokens:
            if token == eos:
                return
            yield token

    def stream(self, prompt: str | None = None, **sampling: Any) -> Iterator[str]:
        """Ingests ``prompt`` (if any), then yields the continuation piece by piece (whole UTF-8
        characters). Keyword arguments as ``stream_ids``."""
        ids = None if prompt is None else self.encode(prompt)
        yield from _pieces(self.stream_ids(ids, **sampling), self.tokenizer)

    def generate(self, prompt: str | None = None, **sampling: Any) -> str:
        """The whole continuation as one string (see ``stream``)."""
        return "".join(self.stream(prompt, **sampling))

    def close(self) -> None:
        """Commits, releases the memory and writes the telemetry's LOD map; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._session.close()
        finally:
            if self.telemetry is not None:
                self.telemetry.close()
                if self.telemetry.records:
                    png = self.telemetry.path.with_name("lod_map.png")
                    plot_lod_map(self.telemetry.records, self._session.k, png)

    def _open(self) -> None:
        if self._closed:
            raise SessionError(f"the session over {self.memory} is closed")


def load(path: str | Path) -> Model:
    """The model of a training workdir (its newest intact checkpoint) or of a local Hugging Face
    directory (``config.json`` + safetensors + ``tokenizer.json``: a plain decoder).

    Raises ``CheckpointError`` / ``PretrainedError`` (one line) for a missing or broken one.
    """
    from megacontext_jax.training.checkpoint import CONFIG_FILE, CheckpointError
    from megacontext_jax.training.restore import load as load_checkpoint

    path = Path(path)
    if _is_hf_directory(path):
        return _load_hf(path)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"no checkpoint at {path}: {CONFIG_FILE} not found")
    module, config, step = load_checkpoint(path)
    return Model(module, config, path, step)


def _is_hf_directory(path: Path) -> bool:
    if (path / "checkpoints").is_dir() or not (path / "config.json").is_file():
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except ValueError:
        return False


def _load_hf(path: Path) -> Model:
    from megacontext_jax.config import base_config
    from megacontext_jax.nets.hf_weights import load_weights
    from megacontext_jax.nets.llama import base_config as llama_config
    from megacontext_jax.nets.llama import read_hf_config, sync_config

    config = base_config()
    config.model.family, config.model.hf_path, config.model.smear_keys = "llama", str(path), False
    sync_config(config)
    # Plain decoding re-encodes a window of the newest half when the context is full; a long
    # window makes each step slow on a CPU, so it stops at 2,048 tokens.
    config.data.seq_len = min(int(read_hf_config(path).get("max_position_embeddings", 2048)), 2048)
    config.lock()
    return Model(load_weights(llama_config(config.model), path), config, path, None)


def evaluate(
    model: Model,
    *,
    data: str | None = None,
    protocol: "Protocol | None" = None,
    quick: bool = False,
    progress: bool = True,
    **arguments: Any,
) -> dict:
    """The evaluation of ``python -m megacontext_jax.evaluation`` (same defaults) on held-out
    documents (``data``: a directory or .jsonl; default the run's held-out split): NLL of every
    condition on windows of each length, key tokens, the budget curve, retrieval, and the run's
    identity (checkpoint, step, config hash, the arguments, versions). ``arguments``: fields of
    ``megacontext_jax.evaluation.Protocol`` (``lengths=(4, 8)``, ``windows=64``, ...), over
    ``protocol`` or, with ``quick``, ``Protocol.quick()``. Returns the dict the CLI writes as
    JSON."""
    from megacontext_jax.data.pipeline import evaluation_documents
    from megacontext_jax.evaluation import protocol as ev

    started = time.perf_counter()
    if protocol is not None and quick:
        raise ValueError("evaluate: give a protocol or quick=True, not both")
    base = protocol or (ev.Protocol.quick() if quick else ev.Protocol())
    try:
        chosen = dataclasses.replace(
            base, **{k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items()}
        )
    except TypeError as e:
        raise ValueError(f"evaluate: {first_line(e)}") from None
    chosen.validate()
    held_out = evaluation_documents(model.config.data, model.tokenizer, data)
    results = ev.evaluate(model.module, model.config, held_out, chosen, progress=progress)
    run = ev.provenance(
        model.config, chosen, started, checkpoint=str(model.path), step=model.step, data=data
    )
    return {"run": run, **results}


def _text(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds characters that are not UTF-8 (at {e.start})") from None
    return text


def _pieces(ids: Iterator[int], tokenizer: ByteTokenizer | HFTokenizer) -> Iterator[str]:
    feed = tokenizer.stream_decoder()
    for token in ids:
        piece = feed(token)
        if piece:
            yield piece
