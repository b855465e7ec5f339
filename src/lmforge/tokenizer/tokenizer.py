"""`Tokenizer`: a Hugging Face `tokenizers` tokenizer plus its special tokens and chat template.

On disk it is the pair Hugging Face uses — `tokenizer.json` and `tokenizer_config.json` (with
`chat_template`) — so a model directory written by lmforge loads in `transformers` unchanged.
`IncrementalDecoder` turns a stream of ids into text without splitting multi-byte characters.
Encoding reads lone surrogates (from bad JSON escapes) as U+FFFD instead of failing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from lmforge.atomic import write_text_atomic
from lmforge.errors import CorruptArtifactError, LmforgeError
from lmforge.tokenizer.chat import CHATML_TEMPLATE, render_chat

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    model_max_length: int | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    # -- ids -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        tid = self.backend.token_to_id(token)
        return None if tid is None else int(tid)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Text → ids. Lone surrogates become U+FFFD; an unencodable text is an LmforgeError."""
        return self._encode([text], add_special_tokens, batch=False)[0]

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Many texts → ids, encoded in parallel in Rust (the fast path for large corpora)."""
        return self._encode(list(texts), add_special_tokens, batch=True)

    def _encode(
        self, texts: list[str], add_special_tokens: bool, *, batch: bool
    ) -> list[list[int]]:
        try:
            if batch:
                encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            else:
                encodings = [self.backend.encode(texts[0], add_special_tokens=add_special_tokens)]
        except TypeError:
            # Lone surrogates ('\ud83d' from a bad JSON escape) cannot cross into Rust as UTF-8;
            # they are looked for only after such a failure, so valid text pays nothing.
            fixed = [replace_surrogates(t) if isinstance(t, str) else t for t in texts]
            if fixed == texts:
                raise
            return self._encode(fixed, add_special_tokens, batch=batch)
        except Exception as exc:  # e.g. a character-level vocabulary without the character
            raise LmforgeError(_encode_error(self.backend, texts, exc)) from None
        return [list(enc.ids) for enc in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, tid: int) -> str | None:
        tok = self.backend.id_to_token(tid)
        return None if tok is None else str(tok)

    # -- chat ----------------------------------------------------------------------------------

    def render_chat(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        specials = {k: getattr(self, k) or "" for k in SPECIAL_KEYS}
        return render_chat(
            self.chat_template or CHATML_TEMPLATE,
            messages,
            add_generation_prompt=add_generation_prompt,
            **specials,
        )

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Chat messages → ids. The template already writes any BOS, so none is added here."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    # -- files ---------------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        cfg: dict[str, Any] = dict(self.extra_config)
        cfg.update({k: getattr(self, k) for k in SPECIAL_KEYS if getattr(self, k) is not None})
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg["clean_up_tokenization_spaces"] = False
        # The template lmforge renders with (ChatML when the tokenizer has none), so that
        # transformers' apply_chat_template gives the same prompt.
        cfg["chat_template"] = self.chat_template or CHATML_TEMPLATE
        if self.model_max_length:
            cfg["model_max_length"] = self.model_max_length
        return cfg

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into DIRECTORY."""
        d = Path(directory)
        write_text_atomic(d / "tokenizer.json", self.backend.to_str(pretty=False))
        write_text_atomic(
            d / "tokenizer_config.json",
            json.dumps(self.config_dict(), indent=2, ensure_ascii=False),
        )

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a Hugging Face tokenizer directory (tokenizer.json [+ tokenizer_config.json])."""
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise LmforgeError(f"{d} has no tokenizer.json (only fast tokenizers are supported)")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise CorruptArtifactError(f"{path} is not a valid tokenizer.json: {exc}") from None
        cfg: dict[str, Any] = {}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CorruptArtifactError(f"{cfg_path} is not valid JSON: {exc}") from None
        template = cfg.get("chat_template")
        tpl_path = d / "chat_template.jinja"
        if template is None and tpl_path.is_file():
            template = tpl_path.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        specials = {k: _token_text(cfg.get(k)) for k in SPECIAL_KEYS}
        max_len = cfg.get("model_max_length")
        known = {*SPECIAL_KEYS, "chat_template", "model_max_length", "tokenizer_class"}
        return cls(
            backend=backend,
            chat_template=template,
            model_max_length=int(max_len) if isinstance(max_len, int) and max_len < 10**9 else None,
            extra_config={k: v for k, v in cfg.items() if k not in known and _jsonable(v)},
            **specials,
        )


def replace_surrogates(text: str) -> str:
    """Replace lone surrogates with U+FFFD (and join surrogate pairs into their character)."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _encode_error(backend: HFTokenizer, texts: Sequence[str], exc: Exception) -> str:
    """One line for a text the backend refuses, naming the character when it is out of vocab."""
    vocab = backend.get_vocab(with_added_tokens=False)
    if isinstance(backend.model, models.WordLevel) and all(len(tok) == 1 for tok in vocab):
        for text in texts:
            for ch in text:
                if ch not in vocab:
                    return (
                        f"character {ch!r} (U+{ord(ch):04X}) is not in the tokenizer's "
                        f"vocabulary of {len(vocab)} characters"
                    )
    return f"the tokenizer cannot encode the text: {exc}"


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class IncrementalDecoder:
    """Turn ids into text piece by piece, holding back incomplete UTF-8 sequences.

    Decodes a short window (from `prefix` to the end) and emits only what grew past the text
    already emitted, so byte-level BPE pieces that split a character never print as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids up to here have been emitted

    def push(self, tid: int) -> str:
        self.ids.append(tid)
        dec = self.tokenizer.decode
        prev = dec(self.ids[self.prefix : self.read], skip_special_tokens=self.skip_special_tokens)
        new = dec(self.ids[self.prefix :], skip_special_tokens=self.skip_special_tokens)
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new[len(prev) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        dec = self.tokenizer.decode
        prev = dec(self.ids[self.prefix : self.read], skip_special_tokens=self.skip_special_tokens)
        new = dec(self.ids[self.prefix :], skip_special_tokens=self.skip_special_tokens)
        self.prefix = self.read = len(self.ids)
        return new[len(prev) :]
