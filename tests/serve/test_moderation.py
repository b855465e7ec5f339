"""Moderation: the rule engine, versioned rules and policies in a real SQLite registry, the
service a running server asks, and `POST /v1/moderations` (also through the official client)."""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from lmforge.data.pii import PII_RULES_VERSION
from lmforge.errors import LmforgeError
from lmforge.registry import db
from lmforge.registry.audit import list_audit
from lmforge.registry.moderation import (
    Rule,
    Ruleset,
    add_rule,
    current_ruleset,
    effective_policy,
    get_ruleset,
    list_policies,
    remove_rule,
    set_policy,
)
from lmforge.serve.errors import install_error_handlers
from lmforge.serve.moderation import (
    OPENAI_CATEGORIES,
    ModerationService,
    Moderator,
    compile_word,
    normalize,
    router,
)

ACTOR = "test:alice"


def rules(*specs: tuple[str, str, str]) -> Ruleset:
    """A ruleset (version 7) of (category, kind, pattern) rules, as the registry returns them."""
    made = tuple(
        Rule(id=i, version=7, category=c, kind=k, pattern=p, created_at="2025-01-01T00:00:00Z")
        for i, (c, k, p) in enumerate(specs, start=1)
    )
    return Ruleset(version=7, rules=made)


def flagged(moderator: Moderator, text: str) -> list[str]:
    return moderator.check(text).flagged_categories


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = db.connect()  # $LMFORGE_HOME is the test's own (conftest)
    yield engine
    engine.dispose()


# -- the rule engine -----------------------------------------------------------------------------


def test_words_match_whole_words_case_insensitively() -> None:
    moderator = Moderator.from_ruleset(
        rules(
            ("violence", "word", "kill"), ("spam", "word", "buy now"), ("hate", "word", "strasse")
        )
    )
    for text in ("KILL them", "I will kill.", "(kill)", "ＫＩＬＬ", "they said: Kill!"):
        assert flagged(moderator, text) == ["violence"], text
    for text in ("skills", "killer", "overkill", "kill_switch", "kill2", "ki ll"):
        assert flagged(moderator, text) == [], text
    assert flagged(moderator, "BUY\n   Now!") == ["spam"]  # any whitespace between words
    assert flagged(moderator, "buynow") == []
    assert flagged(moderator, "die STRASSE und die Straße") == ["hate"]  # Unicode case folding
    assert flagged(moderator, "Einbahnstraße") == []


def test_words_in_scripts_without_spaces_match_inside_text() -> None:
    moderator = Moderator.from_ruleset(
        rules(("harassment", "word", "坏蛋"), ("hate", "word", "idiot"))
    )
    assert flagged(moderator, "你这个坏蛋啊") == ["harassment"]
    assert flagged(moderator, "你是idiot吗") == ["hate"]  # CJK neighbours are boundaries
    assert flagged(moderator, "你是idiots吗") == []
    assert flagged(moderator, "你是好人") == []


def test_single_words_found_by_lookup_agree_with_their_regex() -> None:
    words = ["kill", "idiot", "café", "naïve", "x2", "straße", "ﬁne"]
    texts = [
        "KILL idiots café NAÏVE x2 x22 fine",
        "Kill-joy; idiot_ (café) naive STRASSE",
        "skill killx 2x2 x2!",
        "你是idiot吗 caféine",
        "ＫＩＬＬ naïvely",
        "",
    ]
    for word in words:
        matcher = compile_word(word)
        assert matcher.token is not None, word
        moderator = Moderator.from_ruleset(rules(("hate", "word", word)))
        for text in texts:
            slow = matcher.pattern.search(normalize(text)) is not None
            assert moderator.check(text).flagged is slow, (word, text)
    assert compile_word("kill you").token is None and compile_word("坏蛋").token is None
    assert compile_word("c++").token is None


def test_regex_rules_ignore_case_and_report_every_match() -> None:
    moderator = Moderator.from_ruleset(
        rules(("illicit", "regex", r"b[a4]d\s+w[o0]rds?"), ("illicit", "word", "contraband"))
    )
    result = moderator.check("B4D  W0RDS about CONTRABAND")
    assert result.flagged and result.flagged_categories == ["illicit"]
    assert sorted(description for _, description in result.matched) == [
        r"rule 1: regex 'b[a4]d\s+w[o0]rds?'",
        "rule 2: word 'contraband'",
    ]
    assert flagged(moderator, "bad") == []


def test_pii_categories_and_the_shape_of_a_result() -> None:
    moderator = Moderator.from_ruleset(rules(("spam", "word", "free money")))
    assert moderator.ruleset_id == f"lmforge-rules-7+pii-{PII_RULES_VERSION}"
    clean = moderator.check("The weather is nice today.")
    assert not clean.flagged and clean.matched == []
    assert set(OPENAI_CATEGORIES) | {"pii", "pii/email", "pii/phone", "spam"} <= set(
        clean.categories
    )
    assert not any(clean.categories.values())
    assert set(clean.category_scores.values()) == {0.0}
    assert clean.categories.keys() == clean.category_scores.keys()

    result = moderator.check("Free money! Mail bob.smith@example.com or call +44 20 7946 0958.")
    assert result.flagged_categories == ["pii", "pii/email", "pii/phone", "spam"]
    assert result.category_scores["pii/email"] == 1.0 and result.category_scores["hate"] == 0.0
    assert ("pii/email", next(d for c, d in result.matched if c == "pii/email")) in result.matched
    assert flagged(moderator, "version 1.2.3.4 of logo@2x.png") == []  # PII's own precision


def test_a_moderator_without_rules_still_finds_pii() -> None:
    moderator = Moderator.from_ruleset(Ruleset(version=0, rules=()))
    assert moderator.ruleset_id == f"lmforge-rules-0+pii-{PII_RULES_VERSION}"
    assert flagged(moderator, "key: AKIAIOSFODNN7EXAMPLE") == ["pii", "pii/secret"]
    assert "spam" not in moderator.check("x").categories


# -- the registry: versioned rules, policies, audit ----------------------------------------------


def test_every_change_writes_a_new_version_and_old_versions_stay_readable(engine: Engine) -> None:
    with engine.connect() as conn:
        assert current_ruleset(conn) == Ruleset(version=0, rules=())
    with engine.begin() as conn:
        v1 = add_rule(conn, category="hate", kind="word", pattern="  idiot ", actor=ACTOR)
    with engine.begin() as conn:
        v2 = add_rule(conn, category="spam", kind="regex", pattern=r"buy\s+now", actor=ACTOR)
    with engine.begin() as conn:
        v3 = remove_rule(conn, rule_id=v2.rules[0].id, actor=ACTOR)
    with engine.begin() as conn:
        v4 = remove_rule(conn, category="spam", pattern=r"buy\s+now", actor=ACTOR)
    assert [v.version for v in (v1, v2, v3, v4)] == [1, 2, 3, 4]
    assert [(r.category, r.pattern) for r in v1.rules] == [("hate", "idiot")]  # stripped
    assert [(r.category, r.kind) for r in v2.rules] == [("hate", "word"), ("spam", "regex")]
    assert [r.category for r in v3.rules] == ["spam"] and v4.rules == ()
    assert v2.rules[0].created_at == v1.rules[0].created_at  # a copy keeps when it was added
    assert len({r.id for v in (v1, v2, v3) for r in v.rules}) == 4  # ids never repeat
    with engine.connect() as conn:
        assert get_ruleset(conn, version=2) == v2
        assert get_ruleset(conn, version=1) == v1
        assert get_ruleset(conn, version=9) is None
        assert current_ruleset(conn) == v4


@pytest.mark.parametrize(
    ("category", "kind", "pattern", "needle"),
    [
        ("Hate", "word", "x", "invalid category 'Hate'"),
        ("h" * 41, "word", "x", "invalid category"),
        ("hate", "glob", "x*", "invalid rule kind 'glob'"),
        ("hate", "regex", "(unclosed", "invalid regex '(unclosed'"),
        ("hate", "regex", "a*", "matches the empty string"),
        ("hate", "word", "   ", "empty word pattern"),
        ("hate", "word", "x" * 501, "at most 500"),
    ],
)
def test_invalid_rules_are_refused_and_write_nothing(
    engine: Engine, category: str, kind: str, pattern: str, needle: str
) -> None:
    with pytest.raises(LmforgeError, match=re.escape(needle)), engine.begin() as conn:
        add_rule(conn, category=category, kind=kind, pattern=pattern, actor=ACTOR)
    with engine.connect() as conn:
        assert current_ruleset(conn).version == 0
        assert list_audit(conn) == []


def test_duplicate_and_unknown_rules_are_errors_that_roll_back(engine: Engine) -> None:
    with engine.begin() as conn:
        add_rule(conn, category="hate", kind="word", pattern="idiot", actor=ACTOR)
    with pytest.raises(LmforgeError, match="already has rule"), engine.begin() as conn:
        add_rule(conn, category="hate", kind="word", pattern="idiot", actor=ACTOR)
    with pytest.raises(LmforgeError, match="no rule with id 999"), engine.begin() as conn:
        remove_rule(conn, rule_id=999, actor=ACTOR)
    with pytest.raises(LmforgeError, match="by its id, or by its category"), engine.begin() as conn:
        remove_rule(conn, category="hate", actor=ACTOR)
    with engine.connect() as conn:
        assert current_ruleset(conn).version == 1


def test_concurrent_writers_get_distinct_versions(engine: Engine) -> None:
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            start.wait()
            for i in range(8):
                with engine.begin() as conn:
                    add_rule(
                        conn, category="spam", kind="word", pattern=f"w{worker}-{i}", actor=ACTOR
                    )
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with engine.connect() as conn:
        latest = current_ruleset(conn)
        versions = [get_ruleset(conn, version=v) for v in range(1, 17)]
    assert latest.version == 16
    assert sorted(r.pattern for r in latest.rules) == sorted(
        f"w{n}-{i}" for n in range(2) for i in range(8)
    )
    # each version is its predecessor plus one rule: no writer copied a stale version
    for before, after in itertools.pairwise(versions):
        assert before is not None and after is not None
        assert [r.pattern for r in after.rules[:-1]] == [r.pattern for r in before.rules]


def test_policy_precedence_key_then_model_then_default(engine: Engine) -> None:
    with engine.connect() as conn:
        none = effective_policy(conn, key="team-a", model="m")
    assert (none.input, none.output, none.updated_at) == ("off", "off", None)
    with engine.begin() as conn:
        set_policy(conn, scope="default", input="flag", output="off", actor=ACTOR)
        set_policy(conn, scope="model:m", input="block", output="flag", actor=ACTOR)
        set_policy(conn, scope="key:team-a", input="off", output="block", actor=ACTOR)
    with engine.connect() as conn:
        assert effective_policy(conn, key="team-a", model="m").scope == "key:team-a"
        assert effective_policy(conn, key="team-b", model="m").scope == "model:m"
        assert effective_policy(conn, key="team-b", model="other").scope == "default"
        assert effective_policy(conn, key=None, model=None).input == "flag"
        assert effective_policy(conn, key="team-a", model=None).output == "block"
    with engine.begin() as conn:
        replaced = set_policy(conn, scope="model:m", input="off", output="off", actor=ACTOR)
    assert (replaced.input, replaced.output) == ("off", "off")
    with engine.connect() as conn:
        scopes = [(p.scope, p.input) for p in list_policies(conn)]
    assert scopes == [("default", "flag"), ("key:team-a", "off"), ("model:m", "off")]


@pytest.mark.parametrize(
    ("scope", "input_", "needle"),
    [
        ("everyone", "flag", "invalid policy scope"),
        ("key:", "flag", "invalid policy scope"),
        ("user:bob", "flag", "invalid policy scope"),
        ("default", "deny", "input must be one of off, flag, block, got 'deny'"),
    ],
)
def test_invalid_policies_are_refused(engine: Engine, scope: str, input_: str, needle: str) -> None:
    with pytest.raises(LmforgeError, match=needle), engine.begin() as conn:
        set_policy(conn, scope=scope, input=input_, output="off", actor=ACTOR)
    with engine.connect() as conn:
        assert list_policies(conn) == []


def test_changes_are_audited_in_the_same_transaction(engine: Engine) -> None:
    with engine.begin() as conn:
        ruleset = add_rule(conn, category="hate", kind="word", pattern="idiot", actor=ACTOR)
        remove_rule(conn, rule_id=ruleset.rules[0].id, actor="cli:bob")
        set_policy(conn, scope="key:team-a", input="block", output="off", actor=ACTOR)
    with engine.connect() as conn:
        entries = list_audit(conn)
    assert [(e.actor, e.action, e.target) for e in entries] == [
        (ACTOR, "moderation.rule_add", "hate"),
        ("cli:bob", "moderation.rule_remove", "hate"),
        (ACTOR, "policy.set", "key:team-a"),
    ]
    assert entries[0].details == {
        "version": 1,
        "rule_id": ruleset.rules[0].id,
        "kind": "word",
        "pattern": "idiot",
    }
    assert entries[2].details["input"] == "block"


# -- the service -------------------------------------------------------------------------------


def test_a_rule_added_to_the_registry_applies_on_the_next_call(engine: Engine) -> None:
    service = ModerationService(engine)
    rules_id, [result] = service.moderate(["you are a nincompoop"])
    assert rules_id == f"lmforge-rules-0+pii-{PII_RULES_VERSION}" and not result.flagged
    assert service.moderator() is service.moderator()  # compiled once per version
    other = db.connect()  # another writer, e.g. the CLI in another process
    try:
        with other.begin() as conn:
            add_rule(conn, category="harassment", kind="word", pattern="nincompoop", actor=ACTOR)
    finally:
        other.dispose()
    rules_id, [result, clean] = service.moderate(["you are a nincompoop", "hello"])
    assert rules_id == f"lmforge-rules-1+pii-{PII_RULES_VERSION}"
    assert result.flagged_categories == ["harassment"] and not clean.flagged


def test_verdicts_follow_the_policy_of_key_and_model(engine: Engine) -> None:
    service = ModerationService(engine)
    with engine.begin() as conn:
        add_rule(conn, category="violence", kind="word", pattern="kill", actor=ACTOR)
    texts = ["hello", "I will kill you"]
    off = service.verdict("team-a", "m", texts)
    assert (off.action, off.flagged, off.categories, off.blocked) == ("off", False, [], False)
    assert off.ruleset_id.startswith("lmforge-rules-1+")
    with engine.begin() as conn:
        set_policy(conn, scope="default", input="flag", output="off", actor=ACTOR)
        set_policy(conn, scope="key:team-a", input="block", output="block", actor=ACTOR)
    flag = service.verdict("team-b", "m", texts)
    assert (flag.action, flag.flagged, flag.categories, flag.blocked) == (
        "flag",
        True,
        ["violence"],
        False,
    )
    assert service.verdict("team-b", "m", texts, direction="output").action == "off"
    block = service.verdict("team-a", "m", texts, direction="output")
    assert block.blocked and block.categories == ["violence"]
    clean = service.verdict("team-a", "m", ["hello"])
    assert clean.action == "block" and not clean.flagged and not clean.blocked
    assert service.policy("team-a", None).scope == "key:team-a"


# -- the route ---------------------------------------------------------------------------------


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.moderation = ModerationService(engine)
    with engine.begin() as conn:
        add_rule(conn, category="hate", kind="word", pattern="idiot", actor=ACTOR)
    with TestClient(app) as client:
        yield client


def test_route_answers_in_openai_shape(client: TestClient) -> None:
    response = client.post("/v1/moderations", json={"input": "You idiot, mail me: a@example.org"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "model", "results"}
    assert body["id"].startswith("modr-") and len(body["id"]) > 10
    assert body["model"] == f"lmforge-rules-1+pii-{PII_RULES_VERSION}"
    [result] = body["results"]
    assert set(result) == {
        "flagged",
        "categories",
        "category_scores",
        "category_applied_input_types",
    }
    assert result["flagged"] is True
    assert set(OPENAI_CATEGORIES) <= set(result["categories"])
    assert {c for c, hit in result["categories"].items() if hit} == {"hate", "pii", "pii/email"}
    assert result["category_scores"]["hate"] == 1.0 and result["category_scores"]["sexual"] == 0.0
    assert result["category_applied_input_types"] == {c: ["text"] for c in result["categories"]}


def test_route_takes_a_list_of_inputs(client: TestClient) -> None:
    body = {"input": ["hello", "IDIOT", ""], "model": "omni-moderation-latest"}
    response = client.post("/v1/moderations", json=body)
    assert response.status_code == 200, response.text
    assert [r["flagged"] for r in response.json()["results"]] == [False, True, False]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"input": []}, "input must hold 1 to 32 strings, got 0"),
        ({"input": ["x"] * 33}, "input must hold 1 to 32 strings, got 33"),
        ({"input": "x" * 32_001}, "input is 32,001 characters long"),
        ({"input": ["ok", "x" * 32_001]}, "input[1] is 32,001 characters long"),
        ({"input": "hi", "user": "bob"}, "user"),
        ({"input": 42}, "input"),
        ({"input": ["a", 1]}, "input"),
        ({"model": "m"}, "input"),
    ],
)
def test_route_bad_input_is_a_400_in_openai_shape(
    client: TestClient, body: dict[str, object], needle: str
) -> None:
    response = client.post("/v1/moderations", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]


def test_route_without_a_service_is_a_503() -> None:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    with TestClient(app) as client:
        response = client.post("/v1/moderations", json={"input": "hi"})
    assert response.status_code == 503
    assert "not configured" in response.json()["error"]["message"]


def test_the_official_client_reads_the_response(client: TestClient) -> None:
    from openai import OpenAI

    openai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    response = openai.moderations.create(input=["hello", "what an idiot"])
    assert response.model.startswith("lmforge-rules-1+")
    assert [r.flagged for r in response.results] == [False, True]
    assert response.results[1].categories.hate is True
    assert response.results[1].category_scores.hate == 1.0
    assert response.results[0].categories.harassment is False
