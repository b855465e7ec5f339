"""`TextStream`: ids → safe text deltas, with stop strings held back until they resolve."""

from __future__ import annotations

import pytest

from lmforge.tokenizer.stream import TextStream


def run(tokenizer, text: str, stop: list[str]) -> tuple[TextStream, list[str]]:  # type: ignore[no-untyped-def]
    """Push TEXT's ids one by one; return the stream and every delta (finish() last)."""
    stream = TextStream(tokenizer, stop)
    deltas = [stream.push(i) for i in tokenizer.encode(text)]
    deltas.append(stream.finish())
    return stream, deltas


def test_stop_string_ends_the_stream(tiny_tokenizer):  # type: ignore[no-untyped-def]
    stream, deltas = run(tiny_tokenizer, "Hello world\n\nmore", ["\n\n", "END"])
    assert "".join(deltas) == stream.text == "Hello world"
    assert stream.stopped
    assert stream.push(tiny_tokenizer.encode("x")[0]) == ""
    assert stream.finish() == ""


def test_earliest_stop_string_wins(tiny_tokenizer):  # type: ignore[no-untyped-def]
    stream, deltas = run(tiny_tokenizer, "a END b\n\nc", ["\n\n", "END"])
    assert "".join(deltas) == "a "
    assert stream.stopped


@pytest.mark.parametrize("stop", ["END", " END x", "ND"])
def test_stop_string_split_across_tokens_is_never_partly_released(tiny_tokenizer, stop):  # type: ignore[no-untyped-def]
    text = "abc END xyz"
    ids = tiny_tokenizer.encode(text)
    assert not any(stop in tiny_tokenizer.decode([i]) for i in ids)  # it spans several ids
    before = text[: text.index(stop)]
    stream = TextStream(tiny_tokenizer, [stop])
    released = ""
    for i in ids:
        released += stream.push(i)
        assert before.startswith(released), released
    released += stream.finish()
    assert released == before
    assert stream.stopped


def test_near_miss_of_a_stop_string_is_released(tiny_tokenizer):  # type: ignore[no-untyped-def]
    text = "EN then ENd"
    stream = TextStream(tiny_tokenizer, ["END"])
    released = [stream.push(i) for i in tiny_tokenizer.encode(text)]
    # Nothing at the end could still become "END", so all is out before finish().
    assert "".join(released) == text
    assert stream.finish() == ""
    assert not stream.stopped


def test_finish_releases_the_held_back_tail(tiny_tokenizer):  # type: ignore[no-untyped-def]
    text = "the quick fox EN"
    stream = TextStream(tiny_tokenizer, ["END", "\n\n"])
    released = "".join(stream.push(i) for i in tiny_tokenizer.encode(text))
    assert released == "the quick fox "  # "EN" could still start "END"
    assert stream.finish() == "EN"
    assert stream.text == text
    assert not stream.stopped


@pytest.mark.parametrize("text", ["Hello world\n\nmore END", "café 東京 🙂 naïve", "<|im_end|>x"])
def test_without_stop_strings_output_is_the_decode(tiny_tokenizer, text):  # type: ignore[no-untyped-def]
    for stop in ([], [""]):  # empty stop strings are ignored
        stream, deltas = run(tiny_tokenizer, text, stop)
        assert "".join(deltas) == tiny_tokenizer.decode(tiny_tokenizer.encode(text))
        assert not stream.stopped
