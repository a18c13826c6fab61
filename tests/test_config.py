"""Config: defaults, YAML/.py loading, dotted overrides, and one-line errors naming the key."""
from pathlib import Path

import pytest
import yaml

from marginface.config import Config, dump_yaml, load_config, parse_override, to_dict
from marginface.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_shipped_synthetic_recipe():
    shipped = load_config(str(REPO / "configs" / "synthetic_mbf.yaml"))
    assert to_dict(shipped) == to_dict(load_config())


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.lr=0.05", "model.embedding_size=256", "data.val=[a.bin, b.bin]",
                             "train.max_steps=7", "train.channels_last=false", "head.params={s: 30, m: 0.35}"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.model.embedding_size == 256
    assert cfg.data.val == ["a.bin", "b.bin"]
    assert cfg.train.max_steps == 7 and cfg.train.channels_last is False
    assert cfg.head.params == {"s": 30, "m": 0.35}


def test_int_given_for_float_is_accepted_and_float_for_int_rejected():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(UserError, match="train.batch_size.*expects int"):
        load_config(None, ["train.batch_size=1.5"])


@pytest.mark.parametrize("override, pattern", [
    ("optim.lr=abc", r"config key 'optim.lr' expects float, got 'abc'"),
    ("optim.lrr=0.1", r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    ("model.backbon=mbf", r"unknown config key 'model.backbon' \(did you mean 'model.backbone'\?\)"),
    ("train.batch_size=0", r"'train.batch_size' must be >= 1"),
    ("optim.lr", r"must look like key=value"),
    ("head.sample_rate=1.5", r"head.sample_rate"),
    ("model.input_size=100", r"multiple of 8"),
])
def test_bad_overrides_fail_with_one_line(override, pattern):
    with pytest.raises(UserError, match=pattern) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key 'optim.momentun' \(did you mean 'optim.momentum'"):
        load_config(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match=r"broken.yaml.*invalid YAML"):
        load_config(str(broken))
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_python_config_file(tmp_path):
    py = tmp_path / "recipe.py"
    py.write_text("config = {'model': {'backbone': 'mobilefacenet', 'embedding_size': 128}, 'optim': {'lr': 0.2}}\n")
    cfg = load_config(str(py), ["optim.lr=0.3"])
    assert (cfg.model.backbone, cfg.model.embedding_size, cfg.optim.lr) == ("mobilefacenet", 128, 0.3)
    nocfg = tmp_path / "nothing.py"
    nocfg.write_text("x = 1\n")
    with pytest.raises(UserError, match="must define a variable named 'config'"):
        load_config(str(nocfg))


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["optim.lr=0.02", "head.margin=cosface"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert to_dict(load_config(str(path))) == to_dict(cfg)


def test_unknown_margin_parameter_is_rejected():
    with pytest.raises(UserError, match="bogus"):
        load_config(None, ["head.params={bogus: 1}"])


def test_parse_override_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=") == ("a", "")
    assert parse_override("x=runs/a=b") == ("x", "runs/a=b")


@pytest.mark.parametrize("name", ["ms1mv3_mbf.yaml", "ms1mv3_r50.yaml"])
def test_published_recipes_load(name):
    cfg = load_config(str(REPO / "configs" / name))
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    assert cfg.optim.lr == raw["optim"]["lr"]
    assert cfg.model.embedding_size == 512
    # the fast-CPU choices of the synthetic default must not leak into real recipes
    assert (cfg.model.width_mult, cfg.model.input_size) == (1.0, 112)
