"""Documents, the train/validation split and the Grain pipelines that turn them into batches.

The embedded default corpus is the running interpreter's own standard library (``.py`` files): long,
real documents on every machine, no download. A directory of text files, a ``.jsonl`` file (one
document per record) or any other text file (one document) works too.
Each document is ``[BOS] + its tokens`` (UTF-8 bytes for the byte tokenizer; ``tokenize`` turns
text into another tokenizer's ids). Documents longer than a training sequence are sampled as
random windows (one example per ``seq_len + 1`` tokens); shorter ones are packed whole into
sequences, padded with ``PAD`` (never a target).
"""

import dataclasses
import json
import sysconfig
import zlib
from pathlib import Path

import grain
import numpy as np

from megacontext_jax.data.tokenizer import ByteTokenizer, HFTokenizer

BYTES = ByteTokenizer()

Example = tuple[int, int, tuple[int, ...]]  # (kind, window index, document ids)
WINDOW, PACK = 0, 1


class DataError(ValueError):
    """Unusable input data (missing, empty, or not text), reported as one line."""


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    data: np.ndarray  # [n] token ids: uint8 UTF-8 bytes, or int32 ids after ``tokenize``


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_text_file(path: Path, name: str) -> Document | None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return Document(name, np.frombuffer(data, dtype=np.uint8)) if data else None


def load_documents(source: str, jsonl_field: str = "text") -> list[Document]:
    """Reads every document of ``source``: "stdlib", a directory, a ``.jsonl`` file, or another
    file, which is one document of plain text (by its name, never its content: a ``.txt`` that
    happens to start with ``{`` is text).

    Files that are not UTF-8 text and empty documents are skipped; no document at all is an error.
    """
    if source == "stdlib":
        root = stdlib_dir()
        paths = [
            p
            for p in root.rglob("*.py")
            if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
        ]
        docs = [_read_text_file(p, str(p.relative_to(root))) for p in sorted(paths)]
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data.source: {source} does not exist")
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            docs = [_read_text_file(p, str(p.relative_to(path))) for p in files]
        elif path.suffix.lower() == ".jsonl":
            docs = _read_jsonl(path, jsonl_field)
        else:
            docs = [_read_text_file(path, path.name)]
    docs = [d for d in docs if d is not None]
    if not docs:
        raise DataError(f"data.source: no non-empty UTF-8 text documents in {source}")
    return docs


def _read_jsonl(path: Path, field: str) -> list[Document]:
    docs = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: not a JSON line ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{lineno}: no string field '{field}' (data.jsonl_field)")
            try:
                data = record[field].encode("utf-8")
            except UnicodeEncodeError as e:  # JSON can spell a lone surrogate, UTF-8 cannot
                raise DataError(
                    f"{path}:{lineno}: field '{field}' holds {record[field][e.start]!r}, a lone "
                    "surrogate, not text"
                ) from None
            if data:
                docs.append(Document(f"{path.name}:{lineno}", np.frombuffer(data, dtype=np.uint8)))
    return docs


def tokenize(docs: list[Document], tokenizer: ByteTokenizer | HFTokenizer) -> list[Document]:
    """Documents as ``tokenizer``'s ids (the byte tokenizer's ids are the bytes already)."""
    if isinstance(tokenizer, ByteTokenizer):
        return docs
    return [Document(d.name, tokenizer.encode(d.data.tobytes())) for d in docs]


def evaluation_documents(
    data_config, tokenizer: ByteTokenizer | HFTokenizer, source: str | None = None
) -> list[Document]:
    """Held-out documents as ``tokenizer``'s ids: all of ``source``, or the validation split of
    the run's own data (``data_config``: the run's ``config.data``)."""
    if source:
        return tokenize(load_documents(source, data_config.jsonl_field), tokenizer)
    docs = load_documents(data_config.source, data_config.jsonl_field)
    return tokenize(split_documents(docs, data_config.val_fraction)[1], tokenizer)


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic split by document name (the same on every machine and run)."""
    return zlib.crc32(name.encode("utf-8")) % 100_000 < val_fraction * 100_000


def split_documents(
    docs: list[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, validation); both non-empty whenever there are at least two documents."""
    val = [d for d in docs if is_validation(d.name, val_fraction)]
    train = [d for d in docs if not is_validation(d.name, val_fraction)]
    if not train or not val:
        if len(docs) < 2:
            raise DataError("need at least two documents for a train/validation split")
        # A tiny corpus can hash all to one side; hold out the last document instead.
        train, val = docs[:-1], docs[-1:]
    return train, val


def make_examples(lengths: list[int], seq_len: int) -> list[Example]:
    """Example specs for documents of token lengths ``lengths`` (BOS included).

    A document of at least ``seq_len + 1`` tokens yields ``length // (seq_len + 1)`` windows;
    shorter documents are packed greedily, in order, into sequences of ``seq_len + 1`` tokens.
    """
    span = seq_len + 1
    examples: list[Example] = []
    pack: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if n >= span:
            examples.extend((WINDOW, w, (i,)) for w in range(n // span))
            continue
        if used + n > span:
            examples.append((PACK, 0, tuple(pack)))
            pack, used = [], 0
        pack.append(i)
        used += n
    if pack:
        examples.append((PACK, 0, tuple(pack)))
    return examples


class Materialize(grain.transforms.RandomMap):
    """Example spec -> ``{"inputs", "targets"}`` int32 ``[L]`` and ``"mask"`` bool ``[L]``.

    Training draws window w's start at random in ``[w * (L + 1), (w + 1) * (L + 1))`` (clipped to
    the document), so every byte can be seen; ``random_windows=False`` starts it at ``w * (L + 1)``
    for a fixed validation set.
    """

    def __init__(
        self,
        docs: list[Document],
        seq_len: int,
        random_windows: bool = True,
        tokenizer: ByteTokenizer | HFTokenizer = BYTES,
    ):
        self.docs, self.seq_len, self.random_windows = docs, seq_len, random_windows
        self.bos, self.pad = tokenizer.bos_id, tokenizer.pad_id

    def _tokens(self, i: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of document i, where token 0 is BOS."""
        data = self.docs[i].data
        body = data[max(start - 1, 0) : stop - 1].astype(np.int32)
        return np.concatenate([[self.bos], body]).astype(np.int32) if start == 0 else body

    def random_map(self, example: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
        kind, window, doc_ids = example
        span = self.seq_len + 1
        if kind == WINDOW:
            n = len(self.docs[doc_ids[0]].data) + 1
            start = window * span
            if self.random_windows:  # stratified: window w starts in [w * span, (w + 1) * span)
                start = min(start + int(rng.integers(0, span)), n - span)
            tokens = self._tokens(doc_ids[0], start, start + span)
        else:
            parts = [self._tokens(i, 0, len(self.docs[i].data) + 1) for i in doc_ids]
            tokens = np.full(span, self.pad, dtype=np.int32)
            packed = np.concatenate(parts)
            tokens[: len(packed)] = packed
        return example_of(tokens, self.bos, self.pad)


def example_of(tokens: np.ndarray, bos: int, pad: int) -> dict[str, np.ndarray]:
    """``{"inputs", "targets", "mask"}`` of a sequence of ``L + 1`` tokens (PAD and BOS are never
    targets)."""
    targets = tokens[1:]
    return {"inputs": tokens[:-1], "targets": targets, "mask": (targets != pad) & (targets != bos)}


class DrawStop(grain.transforms.RandomMap):
    """Adds ``"stop"``, int32 drawn uniformly in ``[low, L]``: the example is read as the
    sequence ``inputs[:stop]`` ending there (the MegaContext objective scores the tokens just
    before it, so its history length varies), and a passkey is planted to end there."""

    def __init__(self, low: int):
        self.low = low

    def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator):
        stop = int(rng.integers(self.low, len(example["inputs"]) + 1))
        return {**example, "stop": np.int32(stop)}


class PlantTask(grain.transforms.RandomMap):
    """With probability ``fraction``, turns an example into a synthetic task over its own text:
    ``"passkey"`` (``tasks.passkey``, over ``inputs[:stop]`` where the example has a ``"stop"``)
    or ``"repeats"`` (``tasks.plant_repeats``). The passkey task adds ``"source"`` to every
    example: int32 ``[2]``, the token span of the key's digits in the needle (``-1, -1``: no
    passkey), which training's needle variants bring to LOD0."""

    def __init__(self, task: str, fraction: float, tokenizer: ByteTokenizer | HFTokenizer = BYTES):
        self.task, self.fraction, self.tokenizer = task, fraction, tokenizer

    def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator):
        none = {"source": np.full(2, -1, np.int32)} if self.task == "passkey" else {}
        if rng.random() >= self.fraction:
            return {**example, **none}
        from megacontext_jax.data import tasks

        tokens = np.append(example["inputs"], example["targets"][-1])
        if self.task == "passkey":
            end = int(example.get("stop", len(tokens) - 1)) + 1
            probe = tasks.passkey(tokens[:end], end, rng, tokenizer=self.tokenizer)
            tokens[:end] = probe.tokens
            planted = {"source": np.array(probe.source, np.int32)}
        else:
            tokens, planted = tasks.plant_repeats(tokens, rng), {}
        out = example_of(tokens, self.tokenizer.bos_id, self.tokenizer.pad_id)
        return {**example, **out, **planted}


def train_dataset(
    docs: list[Document],
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    passkey_fraction: float = 0.0,
    tokenizer: ByteTokenizer | HFTokenizer = BYTES,
    repeat_fraction: float = 0.0,
    min_stop: int = 0,
) -> grain.IterDataset:
    """Endless, reshuffled-every-epoch batches of this process's shard of the examples.

    ``batch_size`` is per process; ``repeat_fraction`` of the sequences get random spans written
    twice (copy practice), then ``passkey_fraction`` of them become passkey tasks. With
    ``min_stop`` > 0 each example also gets a ``"stop"`` in ``[min_stop, seq_len]`` (``DrawStop``).
    Iterators of the result checkpoint with Grain/Orbax.
    """
    examples = make_examples([len(d.data) + 1 for d in docs], seq_len)
    ds = grain.MapDataset.source(examples)[process_index::process_count]
    if len(ds) < batch_size:
        raise DataError(
            f"only {len(ds)} training sequences of length {seq_len} for a per-process batch of "
            f"{batch_size}: add data or lower data.seq_len / train.batch_size"
        )
    ds = ds.shuffle(seed=seed).repeat()
    materialize = Materialize(docs, seq_len, tokenizer=tokenizer)
    ds = ds.random_map(materialize, seed=seed + 1 + 7919 * process_index)
    if min_stop > 0:
        ds = ds.random_map(DrawStop(min_stop), seed=seed + 4 + 7919 * process_index)
    for offset, task, fraction in (
        (3, "repeats", repeat_fraction),
        (2, "passkey", passkey_fraction),
    ):
        if fraction > 0:
            plant = PlantTask(task, fraction, tokenizer)
            ds = ds.random_map(plant, seed=seed + offset + 7919 * process_index)
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()


def validation_batches(
    docs: list[Document],
    seq_len: int,
    batch_size: int,
    num_batches: int,
    tokenizer: ByteTokenizer | HFTokenizer = BYTES,
) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` fixed validation batches (fewer if the data runs out)."""
    examples = make_examples([len(d.data) + 1 for d in docs], seq_len)
    ds = grain.MapDataset.source(examples).random_map(
        Materialize(docs, seq_len, random_windows=False, tokenizer=tokenizer), seed=0
    )
    ds = ds.batch(batch_size, drop_remainder=True)
    batches = [ds[i] for i in range(min(num_batches, len(ds)))]
    if not batches:
        raise DataError(
            f"validation split has fewer than {batch_size} sequences of length {seq_len}: "
            "raise data.val_fraction or lower train.batch_size"
        )
    return batches


def bytes_per_token(batches: list[dict[str, np.ndarray]], token_bytes: np.ndarray) -> float:
    """Mean UTF-8 bytes per target token of ``batches`` (1 for the byte tokenizer): bits per
    byte = bits per token / this."""
    targets = np.concatenate([b["targets"][b["mask"]] for b in batches])
    return float(token_bytes[targets].sum() / max(targets.size, 1))


def unigram_bits_per_byte(
    train_docs: list[Document],
    batches: list[dict[str, np.ndarray]],
    token_bytes: np.ndarray | None = None,
) -> float:
    """Cross-entropy (bits/byte) of the batches' targets under the train split's token frequencies.

    The baseline a model must beat: it knows which tokens are common, nothing about context.
    ``token_bytes``: bytes per id (the tokenizer's ``token_bytes()``; default: the byte tokenizer).
    """
    token_bytes = BYTES.token_bytes() if token_bytes is None else token_bytes
    counts = np.ones(len(token_bytes), dtype=np.float64)  # add-one smoothing
    for d in train_docs:
        counts += np.bincount(d.data, minlength=len(token_bytes))[: len(token_bytes)]
    log2p = np.log2(counts / counts.sum())
    total, n = 0.0, 0
    for b in batches:
        t = b["targets"][b["mask"]]
        total -= log2p[t].sum()
        n += t.size
    return total / n / bytes_per_token(batches, token_bytes)
