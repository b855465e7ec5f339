"""Tokenizer files, chat templates in the sandbox, and incremental decoding."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import TINY_TEXT
from lmforge.errors import LmforgeError
from lmforge.tokenizer import IncrementalDecoder, Tokenizer
from lmforge.tokenizer.chat import CHATML_TEMPLATE, render_chat, validate_messages

CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
]
MULTIBYTE = "café é 東京 and 日本語 🙂😀 ß ü — naïve"


def test_save_load_round_trip(tiny_tokenizer, tmp_path):  # type: ignore[no-untyped-def]
    tok = dataclasses.replace(
        tiny_tokenizer, chat_template=CHATML_TEMPLATE + "{# custom #}", model_max_length=64
    )
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)

    for text in (TINY_TEXT, MULTIBYTE, "<|im_start|>user\nhi<|im_end|>"):
        assert back.encode(text) == tok.encode(text)
    ids = tok.encode(TINY_TEXT)
    assert back.decode(ids) == tok.decode(ids) == TINY_TEXT
    assert (back.bos_token, back.eos_token, back.pad_token, back.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        None,
    )
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert back.chat_template == tok.chat_template
    assert back.model_max_length == 64
    assert back.vocab_size == tok.vocab_size


def test_load_without_tokenizer_json_is_an_error(tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(LmforgeError, match=r"tokenizer\.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"tokenizer\.json"):
        Tokenizer.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# Chat templates


def test_chatml_renders_a_two_turn_conversation_exactly():  # type: ignore[no-untyped-def]
    text = render_chat(CHATML_TEMPLATE, CONVERSATION, add_generation_prompt=False)
    assert text == (
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    )
    prompt = render_chat(CHATML_TEMPLATE, CONVERSATION[:1])
    assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_render_chat_passes_special_tokens(tiny_tokenizer):  # type: ignore[no-untyped-def]
    tok = dataclasses.replace(
        tiny_tokenizer, chat_template="{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    )
    assert tok.render_chat(CONVERSATION) == "<|im_start|>Hi there<|im_end|>"
    ids = tok.encode_chat(CONVERSATION)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>Hi there<|im_end|>"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
        "{% set d = {} %}{{ d.update(a=1) }}",
    ],
)
def test_sandbox_refuses_unsafe_templates(template):  # type: ignore[no-untyped-def]
    with pytest.raises(LmforgeError):
        render_chat(template, CONVERSATION)


@pytest.mark.parametrize(
    "template", ["{{ raise_exception.__globals__ }}", "{{ ''.__class__ }}", "{{ cycler.__init__ }}"]
)
def test_sandbox_hides_unsafe_attributes(template):  # type: ignore[no-untyped-def]
    """One unsafe lookup is an undefined value (printed empty, as Jinja does), never the object."""
    assert render_chat(template + "|", CONVERSATION) == "|"


def test_raise_exception_in_a_template_is_an_lmforge_error():  # type: ignore[no-untyped-def]
    template = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('need a system turn') }}"
        "{% endif %}"
    )
    with pytest.raises(LmforgeError, match="need a system turn"):
        render_chat(template, CONVERSATION)


def test_invalid_template_syntax_is_an_lmforge_error():  # type: ignore[no-untyped-def]
    with pytest.raises(LmforgeError, match="invalid chat template"):
        render_chat("{% for m in messages %}", CONVERSATION)


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "non-empty"),
        ([{"content": "hi"}], "messages[0]"),
        (["hi"], "messages[0]"),
        (
            [{"role": "user", "content": "ok"}, {"role": "wizard", "content": "hi"}],
            "messages[1].role",
        ),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user"}], "messages[0].content is missing"),
        ([{"role": "system"}], "messages[0].content is missing"),
        # Regressions: a non-text part used to vanish silently, answering another question.
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            "messages[0].content[0] is a 'image_url' part",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "without a 'text' string"),
        ([{"role": "user", "content": ["hi"]}], "messages[0].content[0] is a 'str' part"),
        # OpenAI refuses a tool message that answers no call (400)
        (
            [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
            "messages[1].tool_call_id is missing",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "tool", "content": "42", "tool_call_id": 7},
            ],
            "messages[1].tool_call_id is missing",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "tool", "content": "4", "tool_call_id": "c1"},
            ],
            "tool call 'c1', which no earlier assistant message made",
        ),
    ],
)
def test_validate_messages_errors(messages, fragment):  # type: ignore[no-untyped-def]
    with pytest.raises(LmforgeError) as info:
        validate_messages(messages)
    assert fragment in str(info.value)


def test_validate_messages_joins_text_content_parts():  # type: ignore[no-untyped-def]
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "you"}]
    out = validate_messages([{"role": "user", "content": parts}, {"role": "assistant"}])
    assert out == [{"role": "user", "content": "Hello you"}, {"role": "assistant", "content": ""}]


# ---------------------------------------------------------------------------------------------
# IncrementalDecoder


def test_incremental_decoder_never_splits_a_character(tiny_tokenizer):  # type: ignore[no-untyped-def]
    ids = tiny_tokenizer.encode(MULTIBYTE)
    # The test means something only if some ids hold part of a character.
    assert any("\ufffd" in tiny_tokenizer.decode([i]) for i in ids)

    dec = IncrementalDecoder(tiny_tokenizer)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tiny_tokenizer.decode(ids) == MULTIBYTE


def test_incremental_decoder_skips_special_tokens(tiny_tokenizer):  # type: ignore[no-untyped-def]
    ids = tiny_tokenizer.encode("<|im_start|>東京<|im_end|>")
    for skip in (True, False):
        dec = IncrementalDecoder(tiny_tokenizer, skip_special_tokens=skip)
        text = "".join(dec.push(i) for i in ids) + dec.flush()
        assert text == tiny_tokenizer.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" not in tiny_tokenizer.decode(ids)


def test_a_tool_message_answering_a_call_is_accepted():  # type: ignore[no-untyped-def]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    assert [m["content"] for m in validate_messages(messages)] == ["hi", "", "42"]
