"""Configs: the same names in Python, YAML and flags; bad settings name the key."""

from __future__ import annotations

import pytest

from selfdistill.cli import _parser
from selfdistill.config import TrainConfig
from selfdistill.config_io import ConfigError, build, from_args, from_dict, to_dict


def test_yaml_then_flags_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("method: ssd\nsteps: 7\nspd:\n  rank: 4\n  beta: 0.25\nrollout:\n  temperature: 0.7\n")
    ns = _parser().parse_args(["train", "--config", str(y), "--spd.rank", "6", "--data.tasks", "toy-math,toy-code"])
    cfg = from_args(TrainConfig, ns)
    assert cfg.method == "ssd" and cfg.steps == 7
    assert cfg.spd.rank == 6 and cfg.spd.beta == 0.25
    assert cfg.rollout.temperature == 0.7
    assert cfg.data.tasks == ["toy-math", "toy-code"]


def test_roundtrip_through_dict():
    cfg = TrainConfig(steps=3)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data,msg", [
    ({"stpes": 3}, "unknown setting stpes"),
    ({"spd": {"rnak": 3}}, "unknown setting spd.rnak"),
    ({"steps": "many"}, "steps: cannot read 'many' as int"),
    ({"spd": {"beta": 2.0}}, "spd.beta must be in [0, 1]"),
    ({"spd": {"selector": "oracle"}}, "spd.selector: 'oracle' is not one of"),
    ({"eval": {"greedy": "maybe"}}, "eval.greedy: expected true or false"),
    ({"steps": 0}, "steps must be >= 1"),
])
def test_bad_settings_name_the_key(data, msg):
    with pytest.raises(ConfigError, match=None) as e:
        from_dict(TrainConfig, data)
    assert msg in str(e.value)


def test_unreadable_yaml_names_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not readable YAML"):
        build(TrainConfig, y)
