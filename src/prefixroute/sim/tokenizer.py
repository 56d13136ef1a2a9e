"""A deterministic stand-in tokenizer: text to token ids, chat templates, synthetic tokens.

No real tokenizer is available offline, and the simulator needs none: what
matters for prefix caching is (1) how many tokens a text costs, roughly as a
real BPE tokenizer counts them, and (2) that equal text gives equal tokens and
a shared text prefix gives a shared token prefix. `encode` provides both:

* Pre-tokenisation follows Qwen2/Qwen3's regular expression (the GPT-2 family
  pattern): contractions (`'s`, `'ll`, ...); a run of letters with at most one
  leading non-letter (so a leading space or "(" attaches to the word, as in
  GPT-2's " word"); each digit alone; a run of punctuation with an optional
  leading space and trailing newlines; newlines; other whitespace. Every
  character lands in exactly one piece, so the pieces concatenate back to the
  text.
* Each piece is one token, except that a piece longer than `MAX_PIECE_CHARS`
  (10) characters is cut into `CHUNK_CHARS` (8) character chunks, because BPE
  splits long or rare words into several tokens. English prose comes out close
  to a real BPE count: about one token per short word.
* A piece's id is a keyed BLAKE2b hash of its UTF-8 bytes (not Python's
  `hash`, which is salted per process), reduced into
  `[FIRST_ID, VOCAB_SIZE)`; `VOCAB_SIZE` is Qwen's 151,643 ordinary tokens
  and ids below `FIRST_ID` (32) are reserved for special tokens. Distinct
  pieces may share an id (as a 17-bit hash must); equal pieces never differ.

The seed experiment's persona "You are a financial analyst assistant
specializing in market data. " repeated five times encodes to 61 tokens (12
per sentence, " specializing" being two chunks, plus the trailing space);
real Qwen3 gives about 13 per sentence, 65 in all.

`encode_chat` applies a ChatML template like Qwen's:
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then the generation
prompt `<|im_start|>assistant\\n`. Each part is encoded on its own (specials
cut the text, as a real tokenizer's special-token split does), so appending
messages never changes the tokens of earlier ones: chat histories are
prefix-stable. Since the generation prompt equals an assistant message's
header, a next turn even starts with the whole previous prompt followed by the
reply tokens (`reply content + <|im_end|>`).

`synthetic_tokens(key, n)` gives `n` pseudo-random ids per integer key
without any text, for trace blocks: id `j` of key `k` is a 32-bit position
word `P[j]` (SplitMix64 of `j`) XORed with a bijective 32-bit mix of `k`
(MurmurHash3's finaliser), scaled into `[FIRST_ID, VOCAB_SIZE)` by a
multiply-high. Distinct keys in `[0, 2**32)` therefore give different words at
every position, so their sequences differ almost everywhere, and
`synthetic_tokens(k, n)` is a prefix of `synthetic_tokens(k, m)` for `n < m`.
One numpy expression computes a whole batch of keys (`synthetic_blocks`).

The lexicon (`lexicon_text`, `lexicon_tokens`) renders synthetic *text* whose
tokens are known without re-encoding: 6,400 pronounceable four-letter words,
each written with a leading space so that each is exactly one token. Workloads
draw word indices and get the text and its ids (`encode(lexicon_text(i))` ==
`lexicon_tokens(i)`) in O(words), with no regex or hashing per request.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "CHUNK_CHARS",
    "ENDOFTEXT",
    "FIRST_ID",
    "IM_END",
    "IM_START",
    "LEXICON_SIZE",
    "MAX_PIECE_CHARS",
    "VOCAB_SIZE",
    "chat_message",
    "encode",
    "encode_chat",
    "generation_prompt",
    "lexicon_text",
    "lexicon_tokens",
    "pretokenize",
    "synthetic_blocks",
    "synthetic_tokens",
]

TokenIds = npt.NDArray[np.uint32]

VOCAB_SIZE = 151_643
"""Qwen2/Qwen3's ordinary vocabulary size: ordinary ids are below it."""
FIRST_ID = 32
"""Ids below this are reserved for special tokens."""
ENDOFTEXT = 0
IM_START = 1
IM_END = 2
MAX_PIECE_CHARS = 10
"""A pre-token longer than this is cut into chunks."""
CHUNK_CHARS = 8
"""Length of the chunks a long pre-token is cut into (the last may be shorter)."""

_ORDINARY = VOCAB_SIZE - FIRST_ID
_HASH_KEY = b"prefixroute.sim.tokenizer/v1"

# Qwen2's pre-tokeniser pattern, with \p{L} as [^\W\d_] and \p{N} as \d.
_PRETOKEN = re.compile(
    r"'(?i:[sdmt]|ll|ve|re)"
    r"|(?:[^\r\n\w]|_)?[^\W\d_]+"
    r"|\d"
    r"| ?(?:[^\s\w]|_)+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def pretokenize(text: str) -> list[str]:
    """Split `text` into pre-tokens (before long pieces are chunked); they concatenate to `text`.

    O(len(text)).
    """
    return _PRETOKEN.findall(text)


@functools.lru_cache(maxsize=1 << 16)
def _piece_id(piece: str) -> int:
    digest = hashlib.blake2b(piece.encode("utf-8"), digest_size=8, key=_HASH_KEY).digest()
    return FIRST_ID + int.from_bytes(digest, "little") % _ORDINARY


def _frozen(ids: Any) -> TokenIds:
    arr = np.asarray(ids, dtype=np.uint32)
    arr.flags.writeable = False
    return arr


@functools.lru_cache(maxsize=1 << 14)
def encode(text: str) -> TokenIds:
    """The token ids of `text` (a read-only uint32 array; see the module docstring).

    O(len(text)) on first sight; repeated strings are memoised (LRU, 16,384
    strings), which is what makes re-encoding system prompts and fixed
    questions per request free.
    """
    ids: list[int] = []
    for piece in _PRETOKEN.findall(text):
        if len(piece) <= MAX_PIECE_CHARS:
            ids.append(_piece_id(piece))
        else:
            ids.extend(
                _piece_id(piece[i : i + CHUNK_CHARS]) for i in range(0, len(piece), CHUNK_CHARS)
            )
    return _frozen(ids)


@functools.lru_cache(maxsize=256)
def _header(role: str) -> TokenIds:
    return _frozen([IM_START, *encode(role).tolist(), *encode("\n").tolist()])


@functools.cache
def _footer() -> TokenIds:
    return _frozen([IM_END, *encode("\n").tolist()])


def chat_message(role: str, content: TokenIds) -> TokenIds:
    """One templated message: `<|im_start|>role \\n content <|im_end|> \\n` (content already ids).

    O(len(content)).
    """
    return _frozen(np.concatenate((_header(role), content, _footer())))


def generation_prompt() -> TokenIds:
    """`<|im_start|>assistant\\n`: what ends every chat prompt (and starts an assistant message)."""
    return _header("assistant")


def encode_chat(messages: Sequence[Mapping[str, str]]) -> TokenIds:
    """The prompt token ids of chat `messages` (each a `role` and text `content`).

    Every message in the ChatML-like template, then the generation prompt.
    `encode_chat(m + more)` starts with `encode_chat(m)` minus its last
    `len(generation_prompt())` ids (and with all of it when `more` starts with
    an assistant message). O(total characters), memoised per message text.
    """
    parts: list[TokenIds] = []
    for message in messages:
        parts += (_header(message["role"]), encode(message["content"]), _footer())
    parts.append(generation_prompt())
    return _frozen(np.concatenate(parts))


# --- synthetic tokens --------------------------------------------------------------------

_U32 = np.uint32
_U64 = np.uint64


def _splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _fmix32(h: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    # MurmurHash3's finaliser: a bijection of uint32.
    h = h ^ (h >> _U32(16))
    h = h * _U32(0x85EBCA6B)
    h = h ^ (h >> _U32(13))
    h = h * _U32(0xC2B2AE35)
    return h ^ (h >> _U32(16))


_positions: list[npt.NDArray[np.uint32]] = [np.empty(0, dtype=np.uint32)]


def _position_words(n: int) -> npt.NDArray[np.uint32]:
    table = _positions[0]
    if len(table) < n:
        size = max(n, 2 * len(table), 1024)
        table = (_splitmix64(np.arange(size, dtype=np.uint64)) >> _U64(32)).astype(np.uint32)
        _positions[0] = table
    return table[:n]


def _keys(keys: Any) -> npt.NDArray[np.uint32]:
    arr = np.asarray(keys)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError("keys must be a flat sequence of integers")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
        raise ValueError("keys must be within [0, 2**32)")
    return arr.astype(np.uint32)


def synthetic_blocks(keys: Sequence[int] | npt.NDArray[Any], n: int) -> TokenIds:
    """A `(len(keys), n)` array whose row `i` is `synthetic_tokens(keys[i], n)`.

    Vectorised: one XOR, one multiply-high and two casts over the whole
    array, no Python loop (O(len(keys) * n)). Keys must be in `[0, 2**32)`.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    base = _fmix32(_keys(keys))
    words = (base[:, None] ^ _position_words(n)[None, :]).astype(np.uint64)
    words *= _U64(_ORDINARY)
    words >>= _U64(32)
    words += _U64(FIRST_ID)
    return words.astype(np.uint32)


def synthetic_tokens(key: int, n: int) -> TokenIds:
    """`n` deterministic pseudo-random ordinary ids for `key` (read-only; see module docstring).

    Keys must be in `[0, 2**32)`; distinct keys give sequences that differ at
    almost every position; a shorter sequence is a prefix of a longer one. O(n).
    """
    return _frozen(synthetic_blocks([key], n)[0])


# --- lexicon -----------------------------------------------------------------------------

_CONSONANTS = "bdfghjklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
LEXICON_SIZE = len(_SYLLABLES) ** 2
"""Number of lexicon words (6,400)."""


@functools.cache
def _lexicon() -> tuple[npt.NDArray[np.bytes_], TokenIds]:
    words = [" " + a + b for a in _SYLLABLES for b in _SYLLABLES]
    # Every word is 5 ASCII bytes, so a fixed-width bytes array turns a list of
    # indices into text with one gather and one decode (no per-word Python).
    return np.array([w.encode("ascii") for w in words], dtype="S5"), _frozen(
        [_piece_id(w) for w in words]
    )


def lexicon_text(indices: Sequence[int] | npt.NDArray[Any]) -> str:
    """The text of lexicon words `indices` (each " " + four letters, one token). O(len)."""
    return _lexicon()[0][np.asarray(indices, dtype=np.intp)].tobytes().decode("ascii")


def lexicon_tokens(indices: Sequence[int] | npt.NDArray[Any]) -> TokenIds:
    """The token ids of `lexicon_text(indices)`, by table lookup (a new read-only array). O(len)."""
    return _frozen(_lexicon()[1][np.asarray(indices, dtype=np.intp)])
