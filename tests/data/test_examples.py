"""Example readers: every format, header detection both ways, each bad input's one-line error."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lmforge.data.examples import (
    ChatExample,
    LabeledText,
    QAExample,
    TextPair,
    file_sha256,
    read_chat,
    read_labeled,
    read_pairs,
    read_squad,
    read_texts,
)
from lmforge.errors import LmforgeError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def jsonl(tmp_path: Path, name: str, *records: Any) -> Path:
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in records))


def error(read: Callable[..., Any], path: Path, **options: Any) -> str:
    """The message READ raises for PATH, checked to be one line that names the file."""
    with pytest.raises(LmforgeError) as info:
        read(path, **options)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


# -- chat ------------------------------------------------------------------------------------

ANSWER = {"role": "assistant", "content": "4"}


def test_chat_reads_openai_alpaca_and_sharegpt_lines_of_one_file(tmp_path: Path) -> None:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "2+2?"}, ANSWER], "id": 1}),
        "",
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}],
                    },
                    {"role": "assistant", "content": "4", "weight": 1},
                ]
            }
        ),
        json.dumps({"instruction": "Add.", "input": "2+2", "output": "4"}),
        json.dumps({"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be kind."}),
        "   ",
        json.dumps(
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "2+2?"},
                    {"from": "gpt", "value": "4"},
                ]
            }
        ),
    ]
    path = write(tmp_path, "train.jsonl", "\n".join(lines) + "\n")
    got = read_chat(path)
    user = {"role": "user", "content": "2+2?"}
    system = {"role": "system", "content": "Be brief."}
    assert got == [
        ChatExample((user, ANSWER), f"{path}:1"),
        ChatExample((system, user, ANSWER), f"{path}:3"),
        ChatExample(
            ({"role": "user", "content": "Add.\n\n2+2"}, {"role": "assistant", "content": "4"}),
            f"{path}:4",
        ),
        ChatExample(
            (
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "hi"},
            ),
            f"{path}:5",
        ),
        ChatExample((system, user, ANSWER), f"{path}:7"),
    ]


def test_chat_accepts_a_byte_order_mark_and_crlf_line_endings(tmp_path: Path) -> None:
    line = json.dumps({"messages": [{"role": "user", "content": "é"}, ANSWER]})
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n" + line.encode() + b"\r\n")
    got = read_chat(path)
    assert [ex.where for ex in got] == [f"{path}:1", f"{path}:2"]
    assert got[0].messages[0]["content"] == "é"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": "hi"}, '"messages" must be a list of {role, content} objects'),
        ({"messages": []}, '"messages" must be a list of {role, content} objects'),
        ({"messages": ["hi"]}, '"messages" must be a list of {role, content} objects'),
        (
            {"messages": [{"role": "tool", "content": "x"}, ANSWER]},
            "messages[0].role 'tool' is not one of system, user, assistant",
        ),
        (
            {"messages": [{"content": "x"}, ANSWER]},
            "messages[0].role None is not one of system, user, assistant",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, ANSWER]},
            "messages[0].content must be a string or a list of text parts",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}, ANSWER]},
            "messages[0].content[0]: only text parts are supported (got 'image_url')",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}, ANSWER]},
            "messages[0].content[0].text must be a string",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"conversations": {"from": "human"}}, '"conversations" must be a list of {from, value}'),
        (
            {"conversations": [{"from": "bot", "value": "x"}]},
            "conversations[0].from 'bot' is not one of system, human, user, gpt, assistant",
        ),
        (
            {"conversations": [{"from": "gpt", "value": None}]},
            "conversations[0].value must be a string",
        ),
        ({"instruction": "Add."}, '"output" must be a string (Alpaca format)'),
        ({"output": "4"}, '"instruction" must be a string (Alpaca format)'),
        (
            {"instruction": "Add.", "input": 2, "output": "4"},
            '"input" must be a string (Alpaca format)',
        ),
        ({"prompt": "x"}, 'want "messages", "conversations" or "instruction" + "output"'),
        (["a list"], "want a JSON object, got list"),
    ],
)
def test_chat_errors_name_the_file_and_line(tmp_path: Path, record: Any, message: str) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, ANSWER]}
    path = write(tmp_path, "train.jsonl", f"{json.dumps(good)}\n\n{json.dumps(record)}\n")
    assert error(read_chat, path).startswith(f"{path}:3: {message}")


def test_chat_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train.jsonl", '\n{"instruction": "a", "output": "b"}\n{oops}\n')
    assert error(read_chat, path).startswith(f"{path}:3: not valid JSON (")


# -- labeled texts ---------------------------------------------------------------------------


def test_tsv_with_an_sst2_header(tmp_path: Path) -> None:
    path = write(
        tmp_path, "train.tsv", "sentence\tlabel\nhide new secretions \t0\r\n\nit 's a charming\t1\n"
    )
    assert read_labeled(path) == [
        LabeledText("hide new secretions", "0", f"{path}:2"),
        LabeledText("it 's a charming", "1", f"{path}:4"),
    ]


def test_tsv_without_header_like_ag_news_keeps_quotes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ag.tsv",
        'Wall St. Bears Claw Back Into the Black (Reuters) "quoted\tBusiness\n'
        "He said \"no\" 'twice'\tWorld\n",
    )
    assert read_labeled(path) == [
        LabeledText(
            'Wall St. Bears Claw Back Into the Black (Reuters) "quoted', "Business", f"{path}:1"
        ),
        LabeledText("He said \"no\" 'twice'", "World", f"{path}:2"),
    ]


def test_headerless_rows_take_the_first_column_as_text_and_the_last_as_label(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "three.tsv", "good film\tignored\tpos\nbad film\tx\tneg\n")
    assert [(ex.text, ex.label) for ex in read_labeled(path)] == [
        ("good film", "pos"),
        ("bad film", "neg"),
    ]


def test_csv_header_quoted_commas_and_multiline_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "reviews.csv",
        '\ufeffid,Review,Label\n1,"Great, really great",positive\n'
        '2,"Two\nlines, ""quoted""",negative\n3,fine,neutral\n',
    )
    assert read_labeled(path) == [
        LabeledText("Great, really great", "positive", f"{path}:2"),
        LabeledText('Two\nlines, "quoted"', "negative", f"{path}:3"),
        LabeledText("fine", "neutral", f"{path}:5"),
    ]


def test_csv_without_header(tmp_path: Path) -> None:
    path = write(tmp_path, "plain.csv", '"a, b",x\nc,y\n')
    assert [(ex.text, ex.label, ex.where) for ex in read_labeled(path)] == [
        ("a, b", "x", f"{path}:1"),
        ("c", "y", f"{path}:2"),
    ]


def test_given_field_names_pick_header_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "news.csv", "title,Body,topic,label\nT,the body,sport,9\n")
    assert read_labeled(path, text_field="body", label_field="topic") == [
        LabeledText("the body", "sport", f"{path}:2")
    ]
    assert read_labeled(path, text_field="title")[0].label == "9"


def test_jsonl_labels_may_be_strings_or_integers(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        "train.jsonl",
        {"text": "good", "label": 1},
        {"text": "bad", "label": "neg"},
        {"sentence": "meh", "label": 0, "idx": 3},
    )
    assert read_labeled(path) == [
        LabeledText("good", "1", f"{path}:1"),
        LabeledText("bad", "neg", f"{path}:2"),
        LabeledText("meh", "0", f"{path}:3"),
    ]
    path = jsonl(tmp_path, "custom.jsonl", {"body": "x", "y": 2})
    assert read_labeled(path, text_field="body", label_field="y") == [
        LabeledText("x", "2", f"{path}:1")
    ]


@pytest.mark.parametrize(
    ("name", "text", "options", "message"),
    [
        (
            "a.tsv",
            "sentence\tlabel\ngood\t1\nbad\t0\textra\n",
            {},
            "3: want 2 columns (as in the header), got 3",
        ),
        ("a.tsv", "good\t1\nbad\n", {}, "2: want 2 columns (as in line 1), got 1"),
        ("a.tsv", "only text\n", {}, "1: want at least 2 columns (text ... label), got 1"),
        ("a.tsv", "text\tlabel\n\t1\n", {}, "2: empty text"),
        ("a.tsv", "good\t1\nbad\t \n", {}, "2: empty label"),
        ("a.csv", 'text,label\n"x",1\n,\n"",0\n', {}, "4: empty text"),
        (
            "a.csv",
            'text,label\n"x",1\n"a,b",c,d\n',
            {},
            "3: want 2 columns (as in the header), got 3",
        ),
        (
            "a.tsv",
            "index\tsentence\n0\tit 's fine\n",
            {},
            "1: the header has no label column (columns: index, sentence); "
            "choose one with label_field",
        ),
        (
            "a.tsv",
            "text\tlabel\nx\t1\n",
            {"text_field": "body"},
            "1: no column 'body' in the header",
        ),
        (
            "a.tsv",
            "text\tlabel\nx\t1\n",
            {"text_field": "text", "label_field": "TEXT"},
            "1: the text and label columns are the same (text)",
        ),
        (
            "a.jsonl",
            '{"text": "x", "label": 1}\n{"label": 2}\n',
            {},
            '2: no text field (want one of "text", "sentence"',
        ),
        ("a.jsonl", '{"text": "x", "cls": 1}\n', {}, '1: no label field (want one of "label"'),
        (
            "a.jsonl",
            '{"t": "x", "label": 1}\n',
            {"text_field": "body"},
            "1: no text field (want 'body'; fields: t, label); choose one with text_field",
        ),
        (
            "a.jsonl",
            '{"text": "x", "label": true}\n',
            {},
            '1: "label" must be a string or an integer',
        ),
        (
            "a.jsonl",
            '{"text": "x", "label": 1.5}\n',
            {},
            '1: "label" must be a string or an integer',
        ),
        (
            "a.jsonl",
            '{"text": "x", "label": ["a"]}\n',
            {},
            '1: "label" must be a string or an integer',
        ),
        ("a.jsonl", '{"text": "x", "label": ""}\n', {}, "1: empty label"),
        ("a.jsonl", '{"text": " ", "label": "a"}\n', {}, "1: empty text"),
        ("a.jsonl", '{"text": 5, "label": "a"}\n', {}, '1: "text" must be a string'),
    ],
)
def test_labeled_errors_name_the_file_and_line(
    tmp_path: Path, name: str, text: str, options: dict[str, str], message: str
) -> None:
    path = write(tmp_path, name, text)
    assert error(read_labeled, path, **options).startswith(f"{path}:{message}")


# -- extractive QA ---------------------------------------------------------------------------

CONTEXT = "Super Bowl 50 was won by the Denver Broncos in Santa Clara."


def squad_json(tmp_path: Path, qas: list[dict[str, Any]], context: str = CONTEXT) -> Path:
    data = {
        "version": "1.1",
        "data": [{"title": "SB", "paragraphs": [{"context": context, "qas": qas}]}],
    }
    return write(tmp_path, "dev.json", json.dumps(data, indent=1))


def test_squad_json(tmp_path: Path) -> None:
    path = squad_json(
        tmp_path,
        [
            {
                "id": "q1",
                "question": "Who won?",
                "answers": [
                    {"text": "Denver Broncos", "answer_start": 29},
                    {"text": "the Denver Broncos", "answer_start": 25},
                    {"text": "Denver Broncos", "answer_start": 29},
                ],
            },
            {
                "id": 7,
                "question": "Where?",
                "answers": [{"text": "Santa Clara", "answer_start": 47}],
            },
        ],
    )
    assert read_squad(path) == [
        QAExample(
            "q1",
            "Who won?",
            CONTEXT,
            (("Denver Broncos", 29), ("the Denver Broncos", 25), ("Denver Broncos", 29)),
            f"{path}#q1",
        ),
        QAExample("7", "Where?", CONTEXT, (("Santa Clara", 47),), f"{path}#7"),
    ]


def test_squad_jsonl_in_hf_and_list_forms(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        "dev.jsonl",
        {
            "id": "a",
            "title": "SB",
            "question": "Who?",
            "context": CONTEXT,
            "answers": {"text": ["Denver Broncos"], "answer_start": [29]},
        },
        {
            "id": "b",
            "question": "Where?",
            "context": CONTEXT,
            "answers": [{"text": "Santa Clara", "answer_start": 47}],
        },
    )
    assert read_squad(path) == [
        QAExample("a", "Who?", CONTEXT, (("Denver Broncos", 29),), f"{path}:1"),
        QAExample("b", "Where?", CONTEXT, (("Santa Clara", 47),), f"{path}:2"),
    ]


def test_squad_eval_files_may_have_questions_without_answers(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        "test.jsonl",
        {
            "id": "a",
            "question": "Who?",
            "context": CONTEXT,
            "answers": {"text": [], "answer_start": []},
        },
        {"id": "b", "question": "Why?", "context": CONTEXT},
    )
    assert [ex.answers for ex in read_squad(path, require_answers=False)] == [(), ()]
    assert error(read_squad, path) == f"{path}:1: question has no answers"
    path = squad_json(tmp_path, [{"id": "q1", "question": "Who?", "answers": []}])
    assert read_squad(path, require_answers=False)[0].answers == ()
    assert error(read_squad, path) == f"{path}#q1: question has no answers"


def test_squad_answer_not_at_its_offset(tmp_path: Path) -> None:
    path = squad_json(
        tmp_path,
        [
            {"id": "ok", "question": "Who?", "answers": [{"text": "Denver", "answer_start": 29}]},
            {"id": "bad", "question": "Who?", "answers": [{"text": "xyz", "answer_start": 17}]},
        ],
    )
    assert error(read_squad, path) == f"{path}#bad: answer 'xyz' is not in its context at offset 17"
    path = jsonl(
        tmp_path,
        "dev.jsonl",
        {
            "id": "a",
            "question": "Who?",
            "context": CONTEXT,
            "answers": {"text": ["Denver"], "answer_start": [29]},
        },
        {
            "id": "b",
            "question": "Who?",
            "context": CONTEXT,
            "answers": {"text": ["Denver"], "answer_start": [30]},
        },
    )
    assert (
        error(read_squad, path) == f"{path}:2: answer 'Denver' is not in its context at offset 30"
    )


@pytest.mark.parametrize(
    ("qa", "message"),
    [
        (
            {"question": "Who?", "answers": []},
            ': data[0].paragraphs[0].qas[0]: "id" must be a string',
        ),
        ({"id": "q", "answers": []}, '#q: "question" must be a non-empty string'),
        ({"id": "q", "question": "Who?", "answers": {"text": "x"}}, '#q: "answers" must be a list'),
        (
            {"id": "q", "question": "Who?", "answers": [{"answer_start": 0}]},
            '#q: an answer\'s "text"',
        ),
        (
            {"id": "q", "question": "Who?", "answers": [{"text": "Super", "answer_start": "0"}]},
            "#q: answer 'Super': \"answer_start\" must be an integer >= 0",
        ),
        (
            {"id": "q", "question": "Who?", "answers": [{"text": "Super", "answer_start": -1}]},
            "#q: answer 'Super': \"answer_start\" must be an integer >= 0",
        ),
    ],
)
def test_squad_json_errors_name_the_question(
    tmp_path: Path, qa: dict[str, Any], message: str
) -> None:
    path = squad_json(tmp_path, [qa])
    assert error(read_squad, path).startswith(f"{path}{message}")


def test_squad_json_structure_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "a.json", '{"data": [\n  {"paragraphs": [}\n]}')
    assert error(read_squad, path).startswith(f"{path}:2: not valid JSON (")
    path = write(tmp_path, "b.json", '[{"id": "q"}]')
    assert error(read_squad, path).startswith(f'{path}: want a SQuAD object {{"data": [...]}}')
    path = write(tmp_path, "c.json", '{"data": [{"title": "x"}]}')
    assert error(read_squad, path) == f'{path}: data[0]: "paragraphs" must be a list'
    path = write(tmp_path, "d.json", '{"data": [{"paragraphs": [{"context": "", "qas": []}]}]}')
    assert error(read_squad, path) == (
        f'{path}: data[0].paragraphs[0]: "context" must be a non-empty string'
    )
    path = write(tmp_path, "e.json", '{"data": [{"paragraphs": [{"context": "c"}]}]}')
    assert error(read_squad, path) == f'{path}: data[0].paragraphs[0]: "qas" must be a list'


def test_squad_jsonl_errors_and_duplicate_ids(tmp_path: Path) -> None:
    good = {
        "id": "a",
        "question": "Who?",
        "context": CONTEXT,
        "answers": [{"text": "Super", "answer_start": 0}],
    }
    path = jsonl(
        tmp_path, "a.jsonl", good, {**good, "answers": {"text": ["Super"], "answer_start": []}}
    )
    assert error(read_squad, path).startswith(f'{path}:2: "answers" must hold lists')
    path = jsonl(tmp_path, "b.jsonl", good, {**good, "id": None})
    assert error(read_squad, path) == f'{path}:2: "id" must be a string'
    path = jsonl(tmp_path, "c.jsonl", good, {**good, "context": 3})
    assert error(read_squad, path) == f'{path}:2: "context" must be a non-empty string'
    path = jsonl(tmp_path, "d.jsonl", good, {**good, "id": "b"}, good)
    assert error(read_squad, path) == f"{path}:3: duplicate question id 'a'"
    qa = {"id": "q", "question": "Who?", "answers": [{"text": "Super", "answer_start": 0}]}
    path = squad_json(tmp_path, [qa, qa])
    assert error(read_squad, path) == f"{path}#q: duplicate question id 'q'"


# -- text pairs ------------------------------------------------------------------------------


def test_pairs_jsonl_take_the_first_present_key_of_each_group(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        "mt.jsonl",
        {"source": "Hallo", "reference": "Hello", "output": "ignored"},
        {"prompt": "Summarise: x", "target": "x"},
        {"input": "a", "output": "b"},
    )
    assert read_pairs(path) == [
        TextPair("Hallo", "Hello", f"{path}:1"),
        TextPair("Summarise: x", "x", f"{path}:2"),
        TextPair("a", "b", f"{path}:3"),
    ]


def test_pairs_tsv_with_and_without_header(tmp_path: Path) -> None:
    path = write(tmp_path, "mt.tsv", "source\treference\nHallo Welt\tHello world\r\n\nJa\tYes\n")
    assert read_pairs(path) == [
        TextPair("Hallo Welt", "Hello world", f"{path}:2"),
        TextPair("Ja", "Yes", f"{path}:4"),
    ]
    path = write(tmp_path, "p.tsv", "prompt\treference\nx\ty\n")
    assert read_pairs(path) == [TextPair("x", "y", f"{path}:2")]
    path = write(tmp_path, "raw.tsv", 'He said "hi"\tEr sagte "hi"\n')
    assert read_pairs(path) == [TextPair('He said "hi"', 'Er sagte "hi"', f"{path}:1")]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.tsv", "x\ty\na\tb\tc\n", "2: want 2 tab-separated columns (source, reference), got 3"),
        ("a.tsv", "x\ty\nonly\n", "2: want 2 tab-separated columns (source, reference), got 1"),
        ("a.tsv", "x\t\n", "1: empty reference"),
        ("a.tsv", "x\ty\n \ty\n", "2: empty source"),
        (
            "a.jsonl",
            '{"source": "x", "reference": "y"}\n{"source": "x"}\n',
            '2: no reference field (want one of "reference", "target", "output"; fields: source)',
        ),
        (
            "a.jsonl",
            '{"text": "x", "reference": "y"}\n',
            '1: no source field (want one of "source", "prompt", "input"',
        ),
        (
            "a.jsonl",
            '{"source": "x", "reference": 3}\n',
            '1: "reference" must be a non-empty string',
        ),
        ("a.jsonl", '{"prompt": "", "target": "y"}\n', '1: "prompt" must be a non-empty string'),
    ],
)
def test_pairs_errors_name_the_file_and_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = write(tmp_path, name, text)
    assert error(read_pairs, path).startswith(f"{path}:{message}")


# -- texts -----------------------------------------------------------------------------------


def test_texts_whole_text_files_and_jsonl_lines(tmp_path: Path) -> None:
    assert read_texts(write(tmp_path, "a.txt", "one\n\ntwo\n")) == ["one\n\ntwo\n"]
    assert read_texts(write(tmp_path, "b.MD", "# T\n")) == ["# T\n"]
    path = jsonl(
        tmp_path, "wiki.jsonl", {"text": " = Valkyria = \n"}, {"text": ""}, {"text": "b", "id": 2}
    )
    assert read_texts(path) == [" = Valkyria = \n", "b"]


def test_texts_errors(tmp_path: Path) -> None:
    path = jsonl(tmp_path, "a.jsonl", {"text": "x"}, {"body": "y"})
    assert error(read_texts, path) == f'{path}:2: no "text" field (fields: body)'
    path = jsonl(tmp_path, "b.jsonl", {"text": ["x"]})
    assert error(read_texts, path) == f'{path}:1: "text" must be a string'
    path = jsonl(tmp_path, "c.jsonl", {"text": ""}, {"text": "  "})
    assert error(read_texts, path) == f"{path}: no examples"
    path = write(tmp_path, "d.txt", " \n\n")
    assert error(read_texts, path) == f"{path}: no examples"


# -- every reader ----------------------------------------------------------------------------

READERS: list[tuple[Callable[..., Any], str]] = [
    (read_chat, ".jsonl"),
    (read_labeled, ".tsv"),
    (read_labeled, ".csv"),
    (read_labeled, ".jsonl"),
    (read_squad, ".json"),
    (read_squad, ".jsonl"),
    (read_pairs, ".jsonl"),
    (read_pairs, ".tsv"),
    (read_texts, ".txt"),
    (read_texts, ".jsonl"),
]


@pytest.mark.parametrize(("read", "suffix"), READERS)
def test_missing_empty_and_blank_files(
    tmp_path: Path, read: Callable[..., Any], suffix: str
) -> None:
    missing = tmp_path / f"missing{suffix}"
    with pytest.raises(LmforgeError) as info:
        read(missing)
    assert str(info.value) == f"{missing}: no such file"
    for name, text in (("empty", ""), ("blank", "\n  \n\n")):
        path = write(tmp_path, name + suffix, text)
        expected = f"{path}: no examples"
        if suffix == ".json":  # an empty file is not JSON at all
            assert error(read, path).startswith(f"{path}:")
        else:
            assert error(read, path) == expected


@pytest.mark.parametrize(("read", "suffix"), READERS)
def test_non_utf8_names_the_file_and_line(
    tmp_path: Path, read: Callable[..., Any], suffix: str
) -> None:
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(b"\n\n" + "caf\u00e9".encode("latin-1") + b"\n")
    message = error(read, path)
    assert message.startswith(f"{path}:3: not valid UTF-8")


def test_unsupported_suffix_and_directories(tmp_path: Path) -> None:
    path = write(tmp_path, "train.json", "[]")
    assert error(read_chat, path) == f"{path}: unsupported file type (want .jsonl)"
    assert error(read_labeled, path) == f"{path}: unsupported file type (want .tsv/.csv/.jsonl)"
    assert error(read_texts, write(tmp_path, "x.parquet", "")).endswith("(want .txt/.md/.jsonl)")
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    assert error(read_chat, folder).startswith(f"{folder}: cannot read (")


def test_path_strings_are_kept_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "t.tsv", "a\tb\n")
    assert read_labeled("t.tsv")[0].where == "t.tsv:1"
    with pytest.raises(LmforgeError, match=r"^nope\.tsv: no such file$"):
        read_labeled("nope.tsv")


def test_file_sha256(tmp_path: Path) -> None:
    data = b"\x00\xffsome bytes\n" * 1000
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    with pytest.raises(LmforgeError, match="no such file"):
        file_sha256(tmp_path / "missing")
