"""Chat templates: messages → prompt text, rendered in a sandboxed Jinja environment.

Templates come from model files (tokenizer_config.json, GGUF metadata), so they are untrusted
code: they run in Jinja's `ImmutableSandboxedEnvironment`, with the globals Hugging Face
templates expect (`raise_exception`, `tojson`, `strftime_now`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError

# ChatML: the default for tokenizers that ship without a template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool", "developer")


def _raise_exception(message: str) -> NoReturn:
    raise LmforgeError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise LmforgeError(f"invalid chat template: {exc}") from None


def validate_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the OpenAI message shape: a non-empty list of {role, content} with text content."""
    if not messages:
        raise LmforgeError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise LmforgeError(f"messages[{i}] must be an object with a 'role'")
        if m["role"] not in ROLES:
            raise LmforgeError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None:
            if m["role"] != "assistant":  # an assistant turn may be empty; a question may not
                raise LmforgeError(
                    f"messages[{i}].content is missing (a {m['role']} message needs text)"
                )
            content = ""
        if isinstance(content, list):  # OpenAI content parts: text only
            content = "".join(_text_part(i, j, p) for j, p in enumerate(content))
        if not isinstance(content, str):
            raise LmforgeError(f"messages[{i}].content must be a string")
        if m["role"] == "tool":
            _check_tool_answer(i, m, messages[:i])
        out.append({**m, "content": content})
    return out


def _check_tool_answer(i: int, message: dict[str, Any], before: Sequence[Any]) -> None:
    """A tool message answers a tool call (OpenAI's rule): it names the call's id, and an
    earlier assistant message made that call."""
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise LmforgeError(
            f"messages[{i}].tool_call_id is missing (a tool message answers a tool call by its id)"
        )
    for earlier in reversed(before):
        if not isinstance(earlier, dict) or earlier.get("role") != "assistant":
            continue
        calls = earlier.get("tool_calls")
        if isinstance(calls, list) and any(
            isinstance(c, dict) and c.get("id") == call_id for c in calls
        ):
            return
    raise LmforgeError(
        f"messages[{i}] answers tool call {call_id!r}, which no earlier assistant message made"
    )


def _text_part(i: int, j: int, part: Any) -> str:
    """The text of content part J of message I; any other kind of part is refused (silently
    dropping an image would answer a question the user did not ask)."""
    where = f"messages[{i}].content[{j}]"
    if not isinstance(part, dict) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise LmforgeError(f"{where} is a {kind!r} part; this model takes text parts only")
    if not isinstance(part.get("text"), str):
        raise LmforgeError(f"{where} is a text part without a 'text' string")
    return str(part["text"])


def render_chat(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **special_tokens: Any,
) -> str:
    """Render MESSAGES with TEMPLATE; `special_tokens` (bos_token, eos_token, …) are passed in."""
    compiled = _compile(template)
    try:
        return str(
            compiled.render(
                messages=validate_messages(messages),
                add_generation_prompt=add_generation_prompt,
                **special_tokens,
            )
        )
    except TemplateError as exc:
        raise LmforgeError(f"chat template failed: {exc}") from None
