"""Typed configs: YAML + overrides, one-line errors naming the key, exit status 2 for entry points."""

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from diffdiv.config import ConfigError, apply_overrides, from_dict, load_config


@dataclass
class Inner:
    n: int = 1
    name: str = "a"


@dataclass
class Outer:
    lr: float = 1e-3
    mode: Literal["x", "y"] = "x"
    inner: Inner = field(default_factory=Inner)
    items: list[float] | None = None
    flag: bool = False


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.5\ninner:\n  n: 3\n")
    cfg = load_config(Outer, p, ["inner.name=b", "items=[1, 2.5]", "flag=true", "mode=y"])
    assert cfg.lr == 0.5 and cfg.inner.n == 3 and cfg.inner.name == "b"
    assert cfg.items == [1.0, 2.5] and cfg.flag is True and cfg.mode == "y"


@pytest.mark.parametrize("data,needle", [
    ({"lrr": 1}, "unknown config key 'lrr'"),
    ({"inner": {"m": 1}}, "unknown config key 'inner.m'"),
    ({"lr": "fast"}, "lr: expected a number"),
    ({"inner": {"n": 1.5}}, "inner.n: expected an integer"),
    ({"mode": "z"}, "mode: 'z' is not one of"),
    ({"flag": "yes"}, "flag: expected true/false"),
    ({"items": "abc"}, "items: expected"),
])
def test_errors_name_the_key(data, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)


def test_override_into_new_section():
    d = apply_overrides({}, ["a.b.c=3"])
    assert d == {"a": {"b": {"c": 3}}}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_train_entry_exits_2_on_bad_key(tmp_path):
    r = subprocess.run([sys.executable, "train/teacher.py", "--config", "configs/digits_teacher.yaml",
                        f"output_dir={tmp_path}/o", "learning_rate=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[0].startswith("error: unknown config key 'learning_rate'")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
