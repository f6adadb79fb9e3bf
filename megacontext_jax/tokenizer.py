"""Byte-level tokenizer: ids 0..255 are bytes, then a few special ids."""

import codecs
from collections.abc import Iterable

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

    def stream_decoder(self):
        """An incremental decoder: ``feed(id) -> str`` emits text once a UTF-8 character completes."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def feed(token: int) -> str:
            return decoder.decode(bytes([token])) if 0 <= token < 256 else ""

        return feed
