"""Token ids → text deltas, with OpenAI-style stop strings.

`TextStream.push(id)` returns the text that is now safe to show: complete characters only, and
never a piece that might turn out to be the start of a stop string. When a stop string appears
the text before it is released and `stopped` becomes True; the stop string itself is not shown.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.tokenizer.tokenizer import IncrementalDecoder, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.pending = ""  # decoded text held back (could start a stop string)
        self.text = ""  # everything released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """Release what is still held back at the end of generation."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if not self.stop:
            out, self.pending = self.pending, ""
            self.text += out
            return out
        hits = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            out = self.pending[:cut]
            self.pending = ""
            self.stopped = True
            self.text += out
            return out
        keep = 0 if final else self._partial_suffix()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        self.text += out
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best
