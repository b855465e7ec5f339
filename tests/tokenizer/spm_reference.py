"""A slow, obvious re-implementation of llama.cpp's SPM tokenizer, the reference for `gguf_spm`.

Written from the behaviour of llama.cpp `src/llama-vocab.cpp` (`tokenizer_st_partition`, the
`LLAMA_VOCAB_TYPE_SPM` branch of `tokenize`, `llm_tokenizer_spm_session`), not from its code:

1. Partition: every control, user-defined and unknown token (types 3, 4, 2), longest first (by
   UTF-8 length), is cut out of the raw text wherever it occurs, before anything else.
2. Each remaining piece of text gets a leading space when `add_space_prefix` is on (llama.cpp
   does it after a special token too, since every piece follows one or starts the text), then
   every " " becomes "▁".
3. The piece is cut into characters; the adjacent pair whose concatenation is a token with the
   highest score is merged, ties going to the leftmost pair, until no pair is a token.
4. A symbol that is a token is output; any other (a character the vocabulary lacks) becomes its
   UTF-8 bytes as `<0xXX>` tokens.

It is checked against llama.cpp's own `llama-tokenize` on real GGUF files by hand (see the
report of issue 22), not in the tests: they have no llama.cpp.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

SPECIAL_TYPES = (2, 3, 4)  # unknown, control, user-defined: cut out of the text first
ASCII_SPACE = " \t\n\v\f\r"  # C isspace(), what llama.cpp's rstrip removes


class SpmReference:
    """llama.cpp's SPM tokenizer over TOKENS / SCORES / TYPES (parse_special on)."""

    def __init__(
        self,
        tokens: Sequence[str],
        scores: Sequence[float],
        types: Sequence[int],
        *,
        add_space_prefix: bool,
        bos_id: int | None = None,
        eos_id: int | None = None,
        rstrip_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.tokens, self.scores = list(tokens), [float(s) for s in scores]
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        self.specials = sorted(
            (i for i, t in enumerate(types) if t in SPECIAL_TYPES),
            key=lambda i: len(tokens[i].encode("utf-8")),
            reverse=True,
        )
        self.add_space_prefix, self.bos_id, self.eos_id = add_space_prefix, bos_id, eos_id
        self.rstrip_ids = rstrip_ids

    def encode(self, text: str) -> list[int]:
        """TEXT → ids, with BOS / EOS when their ids were given."""
        pieces: list[str | int] = [text] if text else []
        for sid in self.specials:
            needle = self.tokens[sid]
            cut: list[str | int] = []
            for piece in pieces:
                if isinstance(piece, int):
                    cut.append(piece)
                    continue
                while (at := piece.find(needle)) >= 0:
                    if at:
                        cut.append(piece[:at])
                    cut.append(sid)
                    piece = piece[at + len(needle) :]
                    if sid in self.rstrip_ids:
                        piece = piece.lstrip(ASCII_SPACE)
                if piece:
                    cut.append(piece)
            pieces = cut
        ids = [] if self.bos_id is None else [self.bos_id]
        for piece in pieces:
            if isinstance(piece, int):
                ids.append(piece)
                continue
            escaped = ((" " if self.add_space_prefix else "") + piece).replace(" ", "\u2581")
            ids += self._merge(escaped)
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _merge(self, text: str) -> list[int]:
        vocab, scores = self.vocab, self.scores
        symbols: list[str] = list(text)  # "" once merged into its left neighbour
        nxt = [*range(1, len(symbols)), -1]
        prv = list(range(-1, len(symbols) - 1))
        queue: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                tid = vocab.get(symbols[left] + symbols[right])
                if tid is not None:
                    size = len(symbols[left]) + len(symbols[right])
                    heapq.heappush(queue, (-scores[tid], left, right, size))

        for i in range(1, len(symbols)):
            push(i - 1, i)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            a, b = symbols[left], symbols[right]
            if not a or not b or len(a) + len(b) != size:
                continue  # one side changed since this pair was queued
            symbols[left], symbols[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        ids: list[int] = []
        for sym in filter(None, symbols):
            if sym in vocab:
                ids.append(vocab[sym])
            else:  # a character the vocabulary lacks: its UTF-8 bytes
                ids += [vocab[f"<0x{b:02X}>"] for b in sym.encode("utf-8")]
        return ids
