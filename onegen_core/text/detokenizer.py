"""Incremental detokenisation and stop strings.

Text is decoded over a short window of recent tokens (the prefix/read offsets
technique) so each new token costs O(1) decoding and a multi-byte character split
across tokens is emitted only when complete. Stop strings are searched in the
accumulated text; text that could be the start of a stop string is held back until
it is known not to be one, so a streamed output never shows a stop string.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far (truncated at a stop string)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stop = stop or []
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> None:
        """Decode one more token; sets ``stopped`` if a stop string appeared (text is cut before it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = max(0, len(self.text) - self.hold)
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            if self.stop:
                hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
                if hits:
                    self.text = self.text[: min(hits)]
                    self.stopped = True

    def take_delta(self, final: bool = False) -> str:
        """Text not yet handed out, minus what might still turn into a stop string."""
        upto = len(self.text) if (final or self.stopped or not self.stop) else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
