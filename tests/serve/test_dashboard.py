"""The dashboard at /dashboard on a real `lmforge serve`: its admin API over HTTP, then the page
in real headless Chromium (Debian's `chromium`, driven by Playwright): sign in, a wrong key sees
nothing, a created key is shown once, a training run's curve grows while it trains, a
playground reply streams in, the request shows up in usage, and HTML in a prompt or a file name
stays text. Screenshots go to $LMFORGE_TEST_ARTIFACTS (default test-artifacts/) /dashboard."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from served import Server, create_key, start_server, stop_server

from conftest import lmforge, lmforge_popen, syllable_text

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
PROBE = "<img src=x onerror=window.__xss=1>"  # HTML a page must show as text
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Dash:
    server: Server
    home: Path
    user_key: str  # a key without admin rights


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    """A home with a data set made from a file whose name is HTML, a model trained on it,
    evaluated and priced, served; and an admin key (the server's) and a plain one."""
    home = tmp_path_factory.mktemp("dash")
    source = home / f"{PROBE}.txt"
    source.write_text(syllable_text(400))
    held_out = home / "held-out.txt"
    held_out.write_text(syllable_text(40, seed=1))
    for args in (
        ["data", "prepare", str(source), "--name", "words", "--tokenizer", "char", "--split",
         "tail", "--workers", "1", "-q"],
        ["train", "--data", "words", "--model", "tiny", "--name", "words", "--max-steps", "20",
         "--batch-size", "4", "--block-size", "32", "--eval-batches", "1", "-q"],
        ["eval", "words", "--task", "perplexity", "--data", str(held_out), "--block-size", "32"],
        ["models", "price", "words", "--input", "1", "--output", "2"],
    ):  # fmt: skip
        proc = lmforge(*args, home=home)
        assert proc.returncode == 0, proc.stderr
    server = start_server(Path("words"), home, "--max-batch", "4")
    yield Dash(server, home, create_key(home, "plain"))
    stop_server(server)


def get(dash: Dash, path: str, key: str | None = None) -> httpx.Response:
    headers = {} if key == "" else {"Authorization": f"Bearer {key or dash.server.key}"}
    return httpx.get(f"{dash.server.url}{path}", headers=headers, timeout=30)


def test_the_page_is_static_and_locked_down(dash: Dash) -> None:
    page = get(dash, "/dashboard", key="")
    assert page.status_code == 200 and "<title>lmforge dashboard</title>" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from another origin
    js = get(dash, "/dashboard/static/app.js", key="")
    assert js.status_code == 200 and "innerHTML" not in js.text
    for name in ("../__init__.py", "..%2f__init__.py", "index.html", "nope.js"):
        assert get(dash, f"/dashboard/static/{name}", key="").status_code == 404, name


@pytest.mark.parametrize(
    "path",
    ["/v1/admin/datasets", "/v1/admin/runs", "/v1/admin/models", "/v1/admin/models/words",
     "/v1/admin/aliases", "/v1/admin/invoices/2026-11"],
)  # fmt: skip
def test_catalog_routes_need_an_admin_key(dash: Dash, path: str) -> None:
    assert get(dash, path, key="").status_code == 401
    refused = get(dash, path, key=dash.user_key)
    assert refused.status_code == 403 and set(refused.json()["error"]) >= {"message", "type"}
    assert get(dash, path).status_code == 200


def test_catalog_routes_show_what_the_chain_recorded(dash: Dash) -> None:
    (ds,) = get(dash, "/v1/admin/datasets").json()["data"]
    assert ds["name"] == "words" and ds["funnel"][0]["step"] == "read"
    runs = get(dash, "/v1/admin/runs").json()["data"]
    assert [r["name"] for r in runs] == ["words"] and runs[0]["status"] == "completed"
    metrics = get(dash, f"/v1/admin/runs/{runs[0]['id']}/metrics").json()
    assert [r["step"] for r in metrics["data"]] == list(range(1, 21))
    after = get(dash, f"/v1/admin/runs/{runs[0]['id']}/metrics?after=15").json()["data"]
    assert [r["step"] for r in after] == [16, 17, 18, 19, 20]
    for bad in ("..", "%2e%2e", "words-x", "..%2fregistry.db"):
        assert get(dash, f"/v1/admin/runs/{bad}/metrics").status_code == 404, bad
    (listed,) = get(dash, "/v1/admin/models").json()["data"]
    assert (listed["name"], listed["version"]) == ("words", 1)
    assert listed["price"] == {"input_per_million": "$1.00", "output_per_million": "$2.00"}
    model = get(dash, "/v1/admin/models/words").json()
    assert model["price"] == {"input_per_million": "$1.00", "output_per_million": "$2.00"}
    assert (
        model["evals"][0]["task"] == "perplexity" and model["evals"][0]["metrics"]["perplexity"] > 1
    )
    sources = []
    stack = [model["lineage"]]
    while stack:
        node = stack.pop()
        sources += [node["label"]] if node["kind"] == "source" else []
        stack += node["children"]
    assert sources and sources[0].endswith(f"{PROBE}.txt")
    assert get(dash, "/v1/admin/models/nope").status_code == 404
    assert get(dash, "/v1/admin/invoices/2026-13").status_code == 400


# -- the page in a real browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.fail("Chromium is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, dash: Dash):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{dash.server.url}/dashboard")
    yield page
    context.close()
    assert not errors, errors  # no script error on any page


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def points(page) -> int:  # type: ignore[no-untyped-def]
    """Points of the run chart on screen (the page's CSP forbids wait_for_function's eval)."""
    return int(page.get_attribute("#run-chart svg", "data-points") or 0)


def sign_in(page, key: str) -> None:  # type: ignore[no-untyped-def]
    page.fill("#admin-key", key)
    page.click("#sign-in button[type=submit]")


def test_a_wrong_or_plain_key_sees_nothing(page, dash: Dash) -> None:  # type: ignore[no-untyped-def]
    for key, needle in (("lmf-not-a-key", "incorrect api key"), (dash.user_key, "admin key")):
        sign_in(page, key)
        page.wait_for_selector(f"#sign-in-error:has-text('{needle}')")
        assert page.is_hidden("#nav") and page.inner_text("#view") == ""
        assert "words" not in page.content()  # no data reached the page
    shot(page, "wrong-key")


def test_create_a_key_and_see_it_once(page, dash: Dash) -> None:  # type: ignore[no-untyped-def]
    sign_in(page, dash.server.key)
    page.wait_for_selector("#view-datasets table")
    assert "words" in page.inner_text("#view-datasets")
    page.click("#nav button[data-tab=keys]")
    page.fill("#create-key input[name=name]", "web-ui")
    page.fill("#create-key input[name=rpm]", "30")
    page.click("#create-key button[type=submit]")
    page.wait_for_selector("#new-key .secret")
    secret = page.inner_text("#new-key .secret")
    assert re.fullmatch(r"lmf-\S{20,}", secret)
    assert httpx.get(f"{dash.server.url}/v1/models", timeout=30,
                     headers={"Authorization": f"Bearer {secret}"}).status_code == 200  # fmt: skip
    shot(page, "key-created")
    page.reload()
    page.wait_for_selector("#view-datasets table")  # still signed in (this tab's session)
    page.click("#nav button[data-tab=keys]")
    page.wait_for_selector("#view-keys table")
    assert "web-ui" in page.inner_text("#view-keys") and secret not in page.content()
    # Change its limits: rpm 30 → 99, tpm none → 5000.
    page.click("#view-keys tr:has-text('web-ui') button.edit")
    page.fill("#edit-key input[name=rpm]", "99")
    page.fill("#edit-key input[name=tpm]", "5000")
    page.click("#edit-key button[type=submit]")
    page.wait_for_selector("#view-keys tr:has-text('web-ui'):has-text('5000')")
    key = get(dash, "/v1/admin/keys/web-ui").json()
    assert (key["rpm"], key["tpm"]) == (99, 5000)
    shot(page, "key-limits")
    page.click("#view-keys tr:has-text('web-ui') button.revoke")
    page.wait_for_selector("#view-keys tr:has-text('web-ui'):has-text('revoked')")
    assert httpx.get(f"{dash.server.url}/v1/models", timeout=30,
                     headers={"Authorization": f"Bearer {secret}"}).status_code == 401  # fmt: skip


def test_a_training_runs_curve_grows_while_it_trains(page, dash: Dash) -> None:  # type: ignore[no-untyped-def]
    train = lmforge_popen(
        "train", "--data", "words", "--model", "tiny", "--name", "live",
        "--max-steps", "100000", "--batch-size", "4", "--block-size", "32", "--eval-every",
        "50", "--eval-batches", "1", "--ckpt-every", "100000", "-q",
        home=dash.home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list((dash.home / "runs").glob("live-*/metrics.jsonl")):
            assert train.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        sign_in(page, dash.server.key)
        page.wait_for_selector("#view-datasets table")
        page.click("#nav button[data-tab=runs]")
        page.wait_for_selector("#run-chart svg")  # the newest run is shown first: live
        assert "live-" in page.inner_text("#run-detail h3")
        first = points(page)
        deadline = time.monotonic() + 30
        while points(page) <= first + 20:  # the page polls; the curve grows on its own
            assert time.monotonic() < deadline, f"the curve stayed at {points(page)} points"
            time.sleep(0.25)
        assert "running" in page.inner_text("#run-status")
        shot(page, "live-run")
    finally:
        train.kill()
        train.wait()


def test_playground_streams_and_the_request_shows_in_usage(page, dash: Dash) -> None:  # type: ignore[no-untyped-def]
    sign_in(page, dash.server.key)
    page.wait_for_selector("#view-datasets table")
    page.click("#nav button[data-tab=playground]")
    page.wait_for_selector("#pg-model option", state="attached")
    page.select_option("#pg-mode", "completion")
    # HTML in a prompt is shown as text; this char-level model cannot even encode it, and the
    # server's 400 (which quotes it) is shown as text too.
    page.fill("#pg-prompt", PROBE)
    page.click("#pg-send")
    page.wait_for_selector("#pg-status:has-text('failed')")
    assert page.inner_text("#pg-log .bubble.user") == PROBE
    assert "not in the tokenizer's vocabulary" in page.inner_text("#pg-log .bubble.error")
    assert page.evaluate("window.__xss") is None and page.locator("#pg-log img").count() == 0
    page.fill("#pg-prompt", "kalo mine ")
    page.click("#pg-send")
    page.wait_for_selector("#pg-status:not(:has-text('streaming'))")
    assert "completion tokens" in page.inner_text("#pg-status"), page.inner_text("#pg-log")
    answer = page.locator("#pg-log .bubble.assistant").last
    pieces = int(answer.get_attribute("data-pieces") or 0)
    completion = int(re.search(r"(\d+) completion tokens", page.inner_text("#pg-status"))[1])
    assert 2 <= pieces <= completion  # rendered chunk by chunk as the chunks arrived
    shot(page, "playground")

    page.click("#nav button[data-tab=models]")
    page.click("#view-models tr.clickable")
    page.wait_for_selector("#lineage")
    assert f"{PROBE}.txt" in page.inner_text("#lineage") and page.evaluate("window.__xss") is None
    shot(page, "model")

    page.click("#nav button[data-tab=usage]")
    page.select_option("#group-by", "key")
    page.wait_for_selector("#usage-out table td:has-text('admin-')")
    row = next(
        line for line in page.inner_text("#usage-out table").splitlines() if "admin-" in line
    )
    assert int(row.split("\t")[1]) >= 1  # at least the playground's request
    page.wait_for_selector("#invoice-out h3")
    assert "Invoice LMF-" in page.inner_text("#invoice-out")
    shot(page, "usage")
