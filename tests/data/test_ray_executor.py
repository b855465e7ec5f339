"""`data prepare --executor ray` on a real local Ray cluster gives the local executor's data set.

Runs under `make test-ray` (LMFORGE_TEST_RAY=1): it starts a Ray head node (`ray start --head`,
token authentication on, 2 CPUs) on 127.0.0.1 and prepares the same three files with both
executors. The corpus plants exact and near duplicates inside a file and across files, so the
MinHash stage is checked across partitions (a file is one Ray Data input row).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, lmforge

pytestmark = pytest.mark.skipif(
    not os.environ.get("LMFORGE_TEST_RAY"), reason="starts a Ray cluster: make test-ray"
)

WORDS = [
    *("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"),
    *("lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi"),
    *("chi", "psi", "omega"),
]


def _corpus(root: Path) -> list[Path]:
    rng = np.random.default_rng(7)
    docs = [" ".join(rng.choice(WORDS, size=60)) + "." for _ in range(240)]
    files: list[list[str]] = [docs[:120], docs[120:], []]
    for i in range(0, 120, 4):  # file 2: near duplicates of file 0 (one word changed) ...
        words = docs[i].split()
        words[30] = "different"
        files[2].append(" ".join(words))
    files[2] += docs[130:140]  # ... exact duplicates of file 1 ...
    files[2] += [" ".join(rng.choice(WORDS, size=60)) + "." for _ in range(20)]  # ... and new
    files[1].insert(5, docs[10])  # an exact duplicate of file 0 inside file 1
    files[0].append("write to jane.roe@example.com about " + docs[3])  # PII, near dup in file 0
    paths = []
    for n, lines in enumerate(files):
        path = root / f"part{n}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Ray head node on 127.0.0.1; yields the environment a client needs to use it."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log_path = tmp_path_factory.mktemp("ray") / "ray.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [
                str(ray_bin),
                "start",
                "--head",
                "--block",
                "--port",
                str(port),
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                "2",
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while "ray start --address" not in log_path.read_text():
        assert head.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "the Ray head did not start"
        time.sleep(0.2)
    yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    head.terminate()
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()


def _prepare(home: Path, files: list[Path], env: dict[str, str] | None, *extra: str) -> Path:
    args = ["data", "prepare", *map(str, files), "--name", "web", "--vocab-size", "300", "-q"]
    if env is None:
        proc = lmforge(*args, *extra, home=home)
    else:
        from conftest import LMFORGE, run_env

        proc = subprocess.run(
            [*LMFORGE, *args, *extra],
            env={**run_env(home), **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr
    return home / "datasets" / "web"


def _comparable(manifest: dict) -> dict:  # type: ignore[type-arg]
    manifest = dict(manifest)
    for volatile in ("created_at", "timing"):
        manifest.pop(volatile)
    manifest["options"] = {
        k: v for k, v in manifest["options"].items() if k not in ("executor", "ray_address")
    }
    return manifest


def test_ray_executor_gives_the_local_data_set(tmp_path: Path, ray_cluster: dict[str, str]) -> None:
    files = _corpus(tmp_path)
    local = _prepare(tmp_path / "local-home", files, None)
    remote = _prepare(tmp_path / "ray-home", files, ray_cluster, "--executor", "ray")

    local_manifest = json.loads((local / "manifest.json").read_text())
    ray_manifest = json.loads((remote / "manifest.json").read_text())
    assert ray_manifest["timing"]["executor"] == "ray"
    assert _comparable(ray_manifest) == _comparable(local_manifest)
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in remote.iterdir())
    for name in names:  # shards, tokenizer, histogram: byte for byte
        if name != "manifest.json":
            assert (local / name).read_bytes() == (remote / name).read_bytes(), name

    # The planted duplicates were found, across files as well as inside them.
    dedup = ray_manifest["dedup"]
    assert dedup["exact_duplicates"] == 11  # 10 of file 1 in file 2, 1 of file 0 in file 1
    assert dedup["near_duplicates"] == 31  # 30 of file 0 in file 2, 1 inside file 0
    part2 = ray_manifest["sources"][2]
    assert part2["documents_read"] == 60 and part2["documents_kept"] == 20  # only the new ones
    assert ray_manifest["pii"]["found"]


def test_an_unreachable_ray_cluster_is_one_line(tmp_path: Path) -> None:
    files = _corpus(tmp_path)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * 64}
    from conftest import LMFORGE, run_env

    proc = subprocess.run(
        [
            *(*LMFORGE, "data", "prepare", str(files[0]), "--name", "w"),
            *("--executor", "ray", "--ray-address", f"127.0.0.1:{free_port()}"),
        ],
        env={**run_env(tmp_path / "home"), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Ray cluster")
    assert not (tmp_path / "home" / "datasets" / "w").exists()


def test_a_bad_record_fails_in_one_line_as_it_does_locally(
    tmp_path: Path, ray_cluster: dict[str, str]
) -> None:
    files = _corpus(tmp_path)
    with open(files[1], "a") as f:
        f.write('{"text": broken\n')
    from conftest import LMFORGE, run_env

    home = tmp_path / "home"
    argv = [*LMFORGE, "data", "prepare", *map(str, files), "--name", "w", "--vocab-size", "300"]
    local = subprocess.run(argv, env=run_env(home), capture_output=True, text=True, timeout=300)
    remote = subprocess.run(
        [*argv, "--executor", "ray"],
        env={**run_env(home), **ray_cluster},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert local.returncode == remote.returncode == 1
    assert remote.stderr.strip() == local.stderr.strip()  # one line, naming file and line
    assert remote.stderr.count("\n") == 1 and "part1.jsonl:122: malformed JSON" in remote.stderr
    assert not (home / "datasets" / "w").exists()
