"""Synthetic long-context retrieval tasks, generated in code over any filler text.

* passkey: a needle such as ``"\\n# the pass key is 48213\\n"`` is planted at a random depth; the
  sequence ends with its question, ``"\\n# what is the pass key? the pass key is 48213"``. The
  answer is the final 5 digits. Phrasings come in two sets (``PHRASINGS``): training plants the
  ``"train"`` ones only; the evaluation also asks the ``"held_out"`` ones, and over ``prose``, a
  kind of filler the code corpus never holds, so that retrieval is not measured on the template
  training learned.
* code: a name assigned once far back, ``"\\nMAX_RETRIES = '48213'\\n"``, and used at the end,
  ``"\\nassert MAX_RETRIES == '48213"`` (never trained).
* repeats (training only): random spans written twice into a text, so a sequence holds many
  tokens that only copying predicts (induction practice), not five answer digits.
* multi-query associative recall (MQAR): ``" key=value"`` pairs are planted through the filler
  (or only before a given token, beyond the window); the sequence ends with queries
  ``" key=value"`` of pairs chosen at random.

Each generator returns the token sequence, the positions whose predictions are the answer
(``answer[i]`` is predicted from position ``answer[i] - 1``), the span holding the needle, and
the span of the planted tokens that hold the answer (what focus must bring to LOD0).
Texts are encoded by the model's tokenizer (bytes by default); answers are the tokens of the key
or value, encoded on their own.
"""

import dataclasses

import numpy as np

from megacontext_jax.data.tokenizer import ByteTokenizer, HFTokenizer

BYTES = ByteTokenizer()


@dataclasses.dataclass(frozen=True)
class Probe:
    tokens: np.ndarray  # int32 [n]
    answer: np.ndarray  # int [a]: positions of the answer tokens
    needle: tuple[int, int]  # token span [start, stop) of the planted fact
    source: tuple[int, int]  # token span of the planted tokens that hold the answer


@dataclasses.dataclass(frozen=True)
class Phrasing:
    """How a passkey is planted (``needle``: the text before and after the key) and asked
    (``question``: the text that ends the sequence, before the key)."""

    needle: tuple[str, str]
    question: str


PHRASINGS = {
    "train": (
        Phrasing(("\n# the pass key is ", "\n"), "\n# what is the pass key? the pass key is "),
        Phrasing(("\n# remember the number ", ".\n"), "\n# the number to remember was "),
        Phrasing(("\n# key: ", " (keep it)\n"), "\n# recall the key: "),
    ),
    "held_out": (
        Phrasing(("\nThe vault opens with code ", ". Do not forget it.\n"), "\nThe vault code is "),
        Phrasing(("\n[memo] ticket number ", " was issued.\n"), "\n[memo] the issued ticket was "),
    ),
}

# Held-out filler: prose (the classic passkey filler's kind of text), which the code corpus
# training reads never holds.
SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river runs past the old mill.",
    "A cold wind came down from the hills.",
    "Nobody spoke for a long while.",
)


def prose(
    num_tokens: int, rng: np.random.Generator, tokenizer: ByteTokenizer | HFTokenizer = BYTES
) -> np.ndarray:
    """``num_tokens`` tokens of prose: ``SENTENCES`` in random order, in paragraphs."""
    pieces, used = [], 0
    while used < num_tokens:
        sentence = SENTENCES[int(rng.integers(len(SENTENCES)))]
        piece = tokenizer.encode(sentence + ("\n\n" if rng.random() < 0.1 else " "))
        pieces.append(piece)
        used += len(piece)
    return np.concatenate(pieces)[:num_tokens].astype(np.int32)


def _plant(
    filler: np.ndarray, length: int, parts: list[tuple[int, np.ndarray]], suffix: np.ndarray
):
    """``filler[:length]`` with ``parts`` written at their offsets and ``suffix`` at the end."""
    if len(filler) < length:
        raise ValueError(f"filler of {len(filler)} tokens is shorter than {length}")
    tokens = np.array(filler[:length], np.int32)
    for offset, part in parts:
        tokens[offset : offset + len(part)] = part
    tokens[length - len(suffix) :] = suffix
    return tokens


def _recall(
    filler: np.ndarray,
    length: int,
    rng: np.random.Generator,
    depth: float | None,
    tokenizer: ByteTokenizer | HFTokenizer,
    needle: tuple[str, str],
    question: str,
    what: str,
) -> Probe:
    """A probe whose 5-digit key is planted between ``needle``'s two texts at ``depth`` (random
    if None) and asked after ``question`` at the end."""
    key = "".join(str(d) for d in rng.integers(0, 10, 5))
    answer = tokenizer.encode(key)
    # Encoded in parts, so that the key's tokens in the needle are the answer's.
    lead = tokenizer.encode(needle[0])
    planted = np.concatenate([lead, answer, tokenizer.encode(needle[1])])
    asked = np.concatenate([tokenizer.encode(question), answer])
    room = length - len(asked) - len(planted) - 1
    if room < 1:
        raise ValueError(f"length {length} leaves no room for a {what}")
    offset = 1 + round((rng.random() if depth is None else depth) * (room - 1))
    tokens = _plant(filler, length, [(offset, planted)], asked)
    answer_at = np.arange(length - len(answer), length)
    key_at = offset + len(lead)
    return Probe(tokens, answer_at, (offset, offset + len(planted)), (key_at, key_at + len(answer)))


def passkey(
    filler: np.ndarray,
    length: int,
    rng: np.random.Generator,
    depth: float | None = None,
    tokenizer: ByteTokenizer | HFTokenizer = BYTES,
    split: str = "train",
) -> Probe:
    """A passkey probe of ``length`` tokens in a random phrasing of ``PHRASINGS[split]``;
    ``depth`` in [0, 1] places the needle (random if None)."""
    phrasings = PHRASINGS[split]
    phrasing = phrasings[int(rng.integers(len(phrasings)))]
    return _recall(
        filler, length, rng, depth, tokenizer, phrasing.needle, phrasing.question, "passkey"
    )


def code(
    filler: np.ndarray,
    length: int,
    rng: np.random.Generator,
    depth: float | None = None,
    tokenizer: ByteTokenizer | HFTokenizer = BYTES,
) -> Probe:
    """A code probe: ``NAME = '48213'`` planted at ``depth``, ``assert NAME == '48213`` at the
    end, with a random upper-case ``NAME``."""
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    name = "".join(rng.choice(letters, 4)) + "_" + "".join(rng.choice(letters, 4))
    return _recall(
        filler,
        length,
        rng,
        depth,
        tokenizer,
        (f"\n{name} = '", "'\n"),
        f"\nassert {name} == '",
        "code probe",
    )


def mqar(
    filler: np.ndarray,
    length: int,
    rng: np.random.Generator,
    pairs: int = 8,
    queries: int = 2,
    tokenizer: ByteTokenizer | HFTokenizer = BYTES,
    before: int | None = None,
) -> Probe:
    """An MQAR probe: ``pairs`` planted ``" abc=42"`` facts, ``queries`` asked at the end; with
    ``before``, every fact ends before that token (beyond a window of the last tokens)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    keys = ["".join(rng.choice(letters, 3)) for _ in range(pairs)]
    values = [f"{v:02d}" for v in rng.integers(0, 100, pairs)]
    facts = [tokenizer.encode(f" {k}={v};") for k, v in zip(keys, values, strict=True)]
    asked = rng.choice(pairs, queries, replace=False)
    # The queries " key=vv;" (the last without ";"), and where their value tokens sit.
    pieces, value_at, used = [], [], 0
    for n, i in enumerate(asked):
        value = tokenizer.encode(values[i])
        parts = [tokenizer.encode(f" {keys[i]}="), value]
        parts += [tokenizer.encode(";")] if n < queries - 1 else []
        value_at.extend(range(used + len(parts[0]), used + len(parts[0]) + len(value)))
        used += sum(len(p) for p in parts)
        pieces += parts
    suffix = np.concatenate(pieces)
    end = length - len(suffix) if before is None else min(before, length - len(suffix))
    room = end - sum(len(f) for f in facts) - 1
    if room < pairs:
        raise ValueError(f"{end} tokens before the queries leave no room for {pairs} pairs")
    gaps = np.sort(rng.choice(room, pairs, replace=False))
    parts, position = [], 1
    for i, fact in enumerate(facts):
        position = 1 + gaps[i] + sum(len(f) for f in facts[:i])
        parts.append((int(position), fact))
    tokens = _plant(filler, length, parts, suffix)
    first, last = parts[0][0], parts[-1][0] + len(facts[-1])
    # The queried facts, from the first planted to the end of the last.
    asked_at = sorted(int(i) for i in asked)
    source = (parts[asked_at[0]][0], parts[asked_at[-1]][0] + len(facts[asked_at[-1]]))
    return Probe(tokens, length - len(suffix) + np.array(value_at), (first, last), source)


def plant_repeats(
    tokens: np.ndarray, rng: np.random.Generator, count: int = 4, longest: int = 32
) -> np.ndarray:
    """A training example for copying: ``count`` times, a span of 8 to ``longest`` tokens, each
    drawn uniformly from the distinct ids of (a copy of) ``tokens``, is written at a random
    position and again later. Token 0 is never written.

    Only the earlier copy predicts the later one (natural repeats are mostly predictable from
    local context), and drawing over distinct ids rather than by frequency keeps most tokens
    unambiguous to look up: a dense signal from which a small byte-level model learns induction.
    """
    tokens = np.array(tokens, np.int32)
    n, ids = len(tokens), np.unique(tokens[1:])
    for _ in range(count):
        length = int(rng.integers(8, longest + 1))
        if n < 1 + 2 * length:
            break
        span = rng.choice(ids, length)
        first = int(rng.integers(1, n - 2 * length + 1))
        second = int(rng.integers(first + length, n - length + 1))
        tokens[first : first + length] = span
        tokens[second : second + length] = span
    return tokens
