"""The text the evaluation scores: windows drawn across every held-out document long enough.

A document is its tokens after a BOS, as training reads it. A window of history length n is
``n + 1`` consecutive tokens starting at a multiple of the stride; its last S tokens are scored
after the n - S before them. Windows are drawn uniformly without replacement from every such
start of every document long enough, by a generator seeded with the seed and n alone: the
same windows for a length whatever the other lengths asked, and every length scores text from
anywhere in the documents, not their prefixes (licence headers and imports).
"""

import dataclasses

import numpy as np

from megacontext_jax.data import pipeline as data


@dataclasses.dataclass(frozen=True)
class Window:
    doc: int  # index into the held-out documents
    start: int  # first token, in the document's BOS-prefixed tokens


def draw(doc_lengths: list[int], n: int, count: int, stride: int, seed: int) -> list[Window]:
    """Up to ``count`` windows of ``n + 1`` tokens over documents of ``doc_lengths`` tokens
    (BOS excluded), sorted by document and start."""
    candidates = [
        Window(d, s)
        for d, length in enumerate(doc_lengths)
        for s in range(0, length + 1 - (n + 1) + 1, stride)
    ]
    rng = np.random.default_rng([seed, n])
    pick = rng.choice(len(candidates), min(count, len(candidates)), replace=False)
    return sorted((candidates[i] for i in pick), key=lambda w: (w.doc, w.start))


def tokens(docs: list[data.Document], window: Window, n: int, bos: int) -> np.ndarray:
    """The ``n + 1`` tokens of ``window``: BOS then the document's, from ``window.start``."""
    seq = docs[window.doc].data
    if window.start == 0:
        return np.concatenate([[bos], seq[:n]]).astype(np.int32)
    return seq[window.start - 1 : window.start + n].astype(np.int32)
