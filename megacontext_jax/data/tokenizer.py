"""Tokenizers: the byte-level one of the GPT family, and a Hugging Face ``tokenizer.json``.

Both give ``encode`` / ``decode`` / ``stream_decoder`` and the special ids the pipeline needs:
``pad_id`` (never a target), ``bos_id`` (starts a document), ``eos_id`` (ends generation).
``tokenizer_for(config.model)`` picks the one a model was trained with.
"""

import codecs
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_collections
import numpy as np

PAD, BOS, EOS = 256, 257, 258


class ByteTokenizer:
    """UTF-8 bytes as ids, plus ``PAD`` (never a target), ``BOS`` (starts a document), ``EOS``."""

    vocab_size = 259
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text: str | bytes, *, bos: bool = False) -> np.ndarray:
        """``text`` (str is UTF-8 encoded) -> int32 ids ``[n]``, optionally led by ``BOS``."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        return np.concatenate([[BOS], ids]).astype(np.int32) if bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Byte ids -> text; special ids are dropped and invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def stream_decoder(self) -> Callable[[int], str]:
        """An incremental decoder: ``feed(id) -> str`` emits text once a UTF-8 character completes."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def feed(token: int) -> str:
            return decoder.decode(bytes([token])) if 0 <= token < 256 else ""

        return feed

    def token_bytes(self) -> np.ndarray:
        """``[vocab_size]`` UTF-8 bytes each id stands for (bits per byte = bits / these)."""
        return (np.arange(self.vocab_size) < 256).astype(np.int64)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` with the special ids of its checkpoint's config."""

    def __init__(self, directory: str | Path, pad_id: int, bos_id: int, eos_id: int):
        from tokenizers import Tokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"no tokenizer.json in {directory}")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def encode(self, text: str | bytes, *, bos: bool = False) -> np.ndarray:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(([self.bos_id] if bos else []) + ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream_decoder(self) -> Callable[[int], str]:
        """``feed(id) -> str``: the new text once it no longer ends in a partial character
        (``tokenizers``' ``DecodeStream``: constant work per token, not a re-decode of the turn)."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)

        def feed(token: int) -> str:
            return stream.step(self.tokenizer, int(token)) or ""

        return feed

    def token_bytes(self) -> np.ndarray:
        special = set(self.tokenizer.get_added_tokens_decoder())
        return np.array(
            [0 if i in special else len(self.decode([i]).encode()) for i in range(self.vocab_size)],
            np.int64,
        )


def special_ids(directory: str | Path) -> dict[str, int]:
    """``pad_id`` / ``bos_id`` / ``eos_id`` of a Hugging Face checkpoint (its ``config.json``).

    A checkpoint without a BOS starts documents with its EOS; without a PAD it pads with EOS.
    """
    hf = json.loads((Path(directory) / "config.json").read_text())

    def first(value):
        return value[0] if isinstance(value, list) else value

    eos = first(hf.get("eos_token_id"))
    if eos is None:
        raise ValueError(f"{directory}/config.json names no eos_token_id")
    bos = first(hf.get("bos_token_id"))
    pad = first(hf.get("pad_token_id"))
    return {
        "pad_id": eos if pad is None else pad,
        "bos_id": eos if bos is None else bos,
        "eos_id": eos,
    }


def tokenizer_for(model: ml_collections.ConfigDict) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a model config (``model.family``)."""
    if model.family == "llama":
        return HFTokenizer(model.hf_path, **special_ids(model.hf_path))
    return ByteTokenizer()


def sampleable(model: ml_collections.ConfigDict) -> np.ndarray:
    """``[vocab_size]`` bool: ids decoding may draw (real tokens and EOS; never PAD, BOS, or the
    padding rows of the embedding table)."""
    ids = np.arange(model.vocab_size)
    ok = (ids < model.num_tokens) & (ids != model.pad_id) & (ids != model.bos_id)
    return ok | (ids == model.eos_id)
