"""Task examples → token ids: chat turns with a loss mask, labelled texts, QA windows.

    ids, mask = chat_features(tokenizer, messages)       # mask[i]: token i is the assistant's
    ids = text_features(tokenizer, "a fine film", max_len=128)
    windows = qa_windows(tokenizer, question, context, max_len=384, doc_stride=128)

Torch-free; used alike by training (`train/tasks.py`), evaluation and the server, so a model
sees at inference exactly the token layout it was trained on.

Chat: the conversation is rendered with the model's own chat template, once per prefix. The text
an assistant turn adds (from the end of the prompt up to it, with the generation prompt, to the
end of the conversation through that turn) is the assistant's: its content and the template's
end-of-turn marker, which the model must learn to emit. Each segment is encoded on its own and
the ids concatenated, so the mask is exact at the boundaries.

QA: the question comes first (`Question: …\\nContext:`), then a window of the context's tokens;
a context longer than the window is split into windows that overlap by `doc_stride` tokens
(Hugging Face `run_qa.py`'s scheme). Each window keeps its tokens' character offsets in the
context, so a predicted token span maps back to the exact substring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

QUESTION_PREFIX = "Question: "
CONTEXT_PREFIX = "\nContext:"
MAX_QUESTION_TOKENS = 64


def pad_id(tokenizer: Tokenizer) -> int:
    """The id that fills right-padded rows: the pad token, else EOS, else 0 (never attended to
    or trained on, so any id would do; these keep the rows readable)."""
    if tokenizer.pad_id is not None:
        return tokenizer.pad_id
    return tokenizer.eos_id or 0


def require_chat_template(tokenizer: Tokenizer, model: str) -> None:
    """Raise unless TOKENIZER has a chat template of its own (SFT renders with it)."""
    if not tokenizer.chat_template:
        raise LmforgeError(
            f"{model} has no chat template: SFT needs one (add `chat_template` to its "
            "tokenizer_config.json, or fine-tune a model that has one)"
        )


def chat_features(
    tokenizer: Tokenizer, messages: Sequence[dict[str, str]]
) -> tuple[list[int], list[bool]]:
    """(ids, mask) of a conversation rendered with TOKENIZER's template; mask marks the tokens
    of the assistant turns (trained on), the rest (system, user, template framing) is context."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise LmforgeError(
                "the chat template does not render a conversation as the prefix of its "
                "continuation; SFT cannot tell the assistant's tokens apart"
            )
        segments += [(prompt[len(done) :], False), (through[len(prompt) :], True)]
        done = through
    if not segments:
        raise LmforgeError("a conversation without an assistant turn has nothing to learn")
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in segments:
        if text:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            mask += [trained] * len(piece)
    return ids, mask


def text_features(tokenizer: Tokenizer, text: str, *, max_len: int) -> list[int]:
    """TEXT's ids for classification, at most MAX_LEN (the start is kept)."""
    ids = tokenizer.encode(text, add_special_tokens=False)[:max_len]
    return ids or [tokenizer.eos_id or 0]


@dataclass(frozen=True)
class QAWindow:
    """One window of a question's context: ids = question prefix + context tokens."""

    ids: list[int]
    context_start: int  # index in ids of the first context token
    offsets: list[tuple[int, int]]  # character span in the context of each context token

    def token_span(self, start_char: int, end_char: int) -> tuple[int, int] | None:
        """The (first, last) ids indices of the tokens covering [start_char, end_char), or
        None when the span is not wholly inside this window."""
        if not self.offsets or start_char < self.offsets[0][0] or end_char > self.offsets[-1][1]:
            return None
        first = next(i for i, (_, e) in enumerate(self.offsets) if e > start_char)
        last = max(i for i, (s, _) in enumerate(self.offsets) if s < end_char)
        if last < first:
            return None
        return self.context_start + first, self.context_start + last

    def char_span(self, first: int, last: int) -> tuple[int, int]:
        """The context characters of ids[first..last] (context tokens)."""
        a, b = first - self.context_start, last - self.context_start
        return self.offsets[a][0], self.offsets[b][1]


def qa_windows(
    tokenizer: Tokenizer, question: str, context: str, *, max_len: int, doc_stride: int
) -> list[QAWindow]:
    """The windows of CONTEXT (each ≤ MAX_LEN ids with the question) overlapping by DOC_STRIDE."""
    prefix = tokenizer.encode(QUESTION_PREFIX + question.strip(), add_special_tokens=False)
    prefix = prefix[:MAX_QUESTION_TOKENS] + tokenizer.encode(
        CONTEXT_PREFIX, add_special_tokens=False
    )
    budget = max_len - len(prefix)
    if budget < 8:
        raise LmforgeError(f"--block-size {max_len} leaves no room for the context")
    if not 0 <= doc_stride < budget:
        raise LmforgeError(f"--doc-stride must be in [0, {budget}), not {doc_stride}")
    encoding = tokenizer.backend.encode(context, add_special_tokens=False)
    ctx_ids, offsets = list(encoding.ids), [tuple(o) for o in encoding.offsets]
    windows = []
    start = 0
    while True:
        end = min(start + budget, len(ctx_ids))
        windows.append(
            QAWindow(
                prefix + ctx_ids[start:end], len(prefix), [(a, b) for a, b in offsets[start:end]]
            )
        )
        if end >= len(ctx_ids):
            return windows
        start = end - doc_stride
