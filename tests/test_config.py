"""`lmforge.config`: defaults < base < YAML file < overrides, every key and type checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from lmforge.config import dump_yaml, from_dict, load_config, parse_overrides, to_dict
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise LmforgeError(f"optim.lr must be positive, not {self.lr}")


@dataclass(frozen=True)
class Run:
    name: str = "run"
    steps: int = 100
    dtype: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    time_limit: float | None = None
    out: Path = Path("runs")
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)


def test_defaults_file_and_overrides_in_that_order(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("steps: 500\noptim:\n  lr: 3.0e-4\n  weight_decay: 0.0\n", encoding="utf-8")
    config = load_config(
        Run,
        base={"name": "preset", "steps": 200},
        file=path,
        overrides=["--optim.lr=1e-4", "--dtype", "bf16", "compile=true", "--tags=[a, b]"],
    )
    assert config == Run(
        name="preset",
        steps=500,
        dtype="bf16",
        compile=True,
        tags=["a", "b"],
        optim=Optim(lr=1e-4, weight_decay=0.0),
    )
    assert load_config(Run) == Run()


def test_dump_round_trips(tmp_path: Path) -> None:
    config = Run(name="x", time_limit=60, tags=["t"], optim=Optim(betas=(0.8, 0.99)))
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(config), encoding="utf-8")
    assert load_config(Run, file=path) == config
    assert to_dict(config)["out"] == "runs" and to_dict(config)["optim"]["betas"] == [0.8, 0.99]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--optim.lrr=1"], r"unknown config key optim\.lrr \(did you mean optim\.lr\?\)"),
        (["--stepz=3"], r"unknown config key stepz \(did you mean steps\?\)"),
        (["--steps=1.5"], r"steps must be int, not 1\.5"),
        (["--steps=true"], r"steps must be int, not True"),
        (["--optim.lr=fast"], r"optim\.lr must be float, not 'fast'"),
        (["--dtype=fp16"], r"dtype must be one of 'fp32', 'bf16', not 'fp16'"),
        (["--optim.betas=[0.9]"], r"optim\.betas must have 2 items"),
        (["--optim=3"], r"optim must be Optim, not 3"),
        (["--optim.lr=-1"], r"optim\.lr must be positive"),
        (["--time_limit=soon"], r"time_limit must be float or NoneType, not 'soon'"),
        (["steps"], r"want --section\.field=value"),
        (["--steps=1", "--steps.x=2"], r"set to a value and a section"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(LmforgeError, match=message):
        load_config(Run, overrides=overrides)


def test_ints_widen_to_float_and_null_clears_optional() -> None:
    config = load_config(Run, overrides=["--optim.lr=1", "--time_limit=null"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.time_limit is None
    assert parse_overrides(["--a.b.c=x y"]) == {"a": {"b": {"c": "x y"}}}


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="no such config file"):
        load_config(Run, file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"bad\.yaml:2"):
        load_config(Run, file=bad)
    bad.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="want a mapping"):
        load_config(Run, file=bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_config(Run, file=empty) == Run()


def test_from_dict_rejects_non_dataclasses_and_missing_required() -> None:
    @dataclass
    class Needs:
        x: int

    with pytest.raises(LmforgeError, match="missing 1 required"):
        from_dict(Needs, {})
    with pytest.raises(TypeError):
        from_dict(dict, {})  # type: ignore[type-var]


def test_yaml_1_1_exponent_floats_are_floats_but_not_ints(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("optim:\n  lr: 3e-4\n", encoding="utf-8")
    assert load_config(Run, file=path).optim.lr == 3e-4
    with pytest.raises(LmforgeError, match="steps must be int, not '1e3'"):
        load_config(Run, overrides=["--steps=1e3"])
