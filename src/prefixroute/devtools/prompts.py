"""Prompt text for token-only requests: one common English word per token id.

A Mooncake trace (`prefixroute.sim.trace`) carries token counts and block
hash ids, no text; the simulator turns each block into synthetic token ids
(`synthetic_tokens(hash_id, 512)`), which a real engine cannot take as a
prompt (the ids need not exist in its vocabulary). `prompt_text(token_ids)`
writes one word per id instead: id `t` becomes `WORDS[t % len(WORDS)]`,
written with a leading space. So

* equal ids give equal text, and requests sharing leading blocks (equal
  leading hash ids, hence equal leading ids) share their leading text, block
  for block;
* the text's token count is the number of ids under any tokenizer that
  keeps each of these words one token: BPE tokenizers split before a
  space-led word, so the words never merge.

`WORDS` are common English words, each one token with its leading space
under GPT-2's vocabulary (r50k) and under cl100k_base (whose ordinary
tokens Llama 3's vocabulary keeps), checked with those vocabularies
(docs/bench.md has the measurement), and each at most 9 letters, so
`prefixroute.sim.tokenizer.encode` (the fake engine's tokenizer) also
counts one token per word. O(len(token_ids)) per prompt: one vectorised
modulo and a join.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["WORDS", "prompt_text"]

_WORD_TEXT = """
    the and for this that with you new from are not was have can all will your out has but
    more his they one time man which any about over work when use other been had were would
    our year some there said her like also than just them into what first only back need
    under then may how people should make after right long read want number two where while
    look could know hand most now him point every show find used play see help these down
    even item did through last high line does before because state here very way call well
    many being good such think much found each own best same made world take day top free
    real main color build table head order place week still team second going home left page
    around really image both level great month life change old book three power big care
    full turn body stand keep come ask small job little better feel always got less sure
    rest cost short done health love able give family water step four far room talk grow
    mean kind light side near country thing why single past write move city tell late low
    price today story meet thought task question word large web deal problem press often
    space store food black card air enter open next game group plan early green blue red
    white fire tree river house road paper school class money night child words heart music
    letter field friend garden window chair door floor wall bread milk coffee tea sugar salt
    apple fruit horse bird fish dog cat animal plant flower grass stone sand rain snow wind
    cloud storm sun moon star sky sea lake hill mountain forest island coast beach north
    south east west winter summer spring autumn morning evening hour minute market shop
    office bank church hospital hotel station train ship boat plane car bus bike street
    bridge park farm village town nation party army king queen prince doctor teacher student
    worker farmer driver writer artist player member leader father mother brother sister son
    daughter wife husband baby girl boy woman men women enemy guest name voice face eye ear
    nose mouth hair arm leg foot skin blood bone brain mind idea goal rule law wrong truth
    fact reason cause effect result answer method system model process action event moment
    period season century history future present area region land ground earth metal gold
    silver iron glass wood cloth cotton oil gas energy heat force speed weight size shape
    circle square center edge bottom middle front inside outside above below deep wide
    narrow heavy strong weak hard soft hot cold warm cool dry wet clean dirty fresh young
    fast slow quick easy simple clear dark bright happy sad angry calm quiet loud rich poor
    cheap safe busy ready close begin start stop end finish win lose buy sell pay send bring
    carry hold leave stay live die fall rise sit walk run jump swim fly drive ride travel
    visit return arrive follow lead wait watch listen hear speak say learn teach study seem
    become remain allow try hate hope wish believe remember forget decide choose agree
    accept offer create break cut fix cook eat drink sleep wake wear wash push pull throw
    catch kill save spend share join happen include provide produce develop increase reduce
    improve support protect prepare explain describe report suggest expect require consider
    continue appear contain depend serve receive
"""

WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
"""Single-token English words (without their leading space), in a fixed order."""


@functools.cache
def _spaced() -> npt.NDArray[np.object_]:
    return np.array([" " + w for w in WORDS], dtype=object)


def prompt_text(token_ids: Sequence[int] | npt.NDArray[Any]) -> str:
    """The text standing for `token_ids`: word `ids[i] % len(WORDS)`, space-led, per id.

    Deterministic; a prefix of ids gives a prefix of the text. O(len(token_ids)).
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    return "".join(_spaced()[ids % len(WORDS)].tolist())
