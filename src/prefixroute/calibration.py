"""Characters per token, learned per model from the token counts engines report.

A request that reaches the router as text (no tokenizer configured for its
model) has a length in characters; the router needs it in tokens (load,
predicted cached tokens, the tokens a character block covers). The fixed
`hashing.chars_per_token` is a guess: 4 fits English under large-vocabulary
tokenizers, while a small vocabulary gives 2 to 3 characters a token (the
tiny model of the real-engine tests: about 2.3). `CharsPerToken` replaces
the guess per model once the engines have reported enough: every completed
text request adds its prompt's characters and the engine's
`usage.prompt_tokens` (which includes what the chat template adds, so the
ratio absorbs it), and the estimate is the ratio of the sums.

Only estimates change. Where a character block is cut stays fixed by the
configured value, so block keys, and the index built from them, do not move
when the estimate does. Bounded: at most `max_models` models (the least
recently updated is forgotten), and the sums are halved whenever the tokens
pass `window_tokens`, so recent traffic dominates. O(1) per update and look-up.
"""

from __future__ import annotations

import math
from collections import OrderedDict

__all__ = ["CharsPerToken"]


class CharsPerToken:
    """Per-model characters per token: `default` until `min_tokens` were reported for it."""

    __slots__ = ("_sums", "default", "max_models", "min_tokens", "window_tokens")

    def __init__(
        self,
        default: float,
        *,
        min_tokens: int = 4096,
        max_models: int = 256,
        window_tokens: int = 1 << 20,
    ) -> None:
        if not (math.isfinite(default) and default > 0):
            raise ValueError(f"default must be a finite number > 0, got {default!r}")
        if min_tokens < 1 or max_models < 1 or window_tokens < min_tokens:
            raise ValueError("min_tokens, max_models >= 1 and window_tokens >= min_tokens")
        self.default = float(default)
        self.min_tokens = min_tokens
        self.max_models = max_models
        self.window_tokens = window_tokens
        self._sums: OrderedDict[str, list[int]] = OrderedDict()  # model -> [chars, tokens]

    def observe(self, model: str, chars: int, tokens: int) -> None:
        """Add one completed request: `chars` of prompt text the engine counted as `tokens`."""
        if chars <= 0 or tokens <= 0:
            return
        sums = self._sums.get(model)
        if sums is None:
            if len(self._sums) >= self.max_models:
                self._sums.popitem(last=False)
            sums = self._sums[model] = [0, 0]
        else:
            self._sums.move_to_end(model)
        sums[0] += chars
        sums[1] += tokens
        if sums[1] > self.window_tokens:
            sums[0] //= 2
            sums[1] //= 2

    def get(self, model: str) -> float:
        """The estimate for `model`: learned once it has `min_tokens`, else `default`."""
        sums = self._sums.get(model)
        if sums is None or sums[1] < self.min_tokens:
            return self.default
        return sums[0] / sums[1]

    def learned(self) -> dict[str, float]:
        """Every model with a learned estimate (for exporters)."""
        return {m: s[0] / s[1] for m, s in self._sums.items() if s[1] >= self.min_tokens}
