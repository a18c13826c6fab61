"""Config: defaults, YAML/.py loading, dotted overrides, and one-line errors naming the key."""
from pathlib import Path

import pytest
import yaml

from marginface.config import Config, dump_yaml, parse_override, to_dict
from marginface.train.runconfig import load_config
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
    cfg = load_config(None, ["optim.lr=0.02", "head.loss=cosface"])
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


# ------------------------------------------------------------------ renamed keys (head.margin -> head.loss,
# data.normalize -> data.input_norm): old files, --set and checkpoint configs keep working


@pytest.fixture
def fresh_notices(monkeypatch):
    import marginface.config as config_module

    monkeypatch.setattr(config_module, "_NOTIFIED", set())


def test_old_key_names_in_a_file_and_in_overrides_still_work(tmp_path, capsys, fresh_notices):
    old = tmp_path / "old.yaml"
    old.write_text("head:\n  margin: cosface\ndata:\n  normalize: imagenet\n")
    cfg = load_config(str(old))
    assert (cfg.head.loss, cfg.data.input_norm) == ("cosface", "imagenet")
    err = capsys.readouterr().err
    assert "'head.margin' is deprecated" in err and "'head.loss'" in err
    assert "'data.normalize' is deprecated" in err and "'data.input_norm'" in err
    assert len(err.strip().splitlines()) == 2  # one line per renamed key
    # an override under either name wins over the file's value under either name
    assert load_config(str(old), ["head.loss=arcface"]).head.loss == "arcface"
    assert load_config(None, ["head.margin=sphereface"]).head.loss == "sphereface"
    assert load_config(None, ["data.normalize=imagenet"]).data.input_norm == "imagenet"
    assert capsys.readouterr().err == ""  # the notice comes once per key and process


def test_old_checkpoint_config_loads(tmp_path, fresh_notices):
    from marginface.config import from_dict

    saved = to_dict(load_config(None))
    saved["head"]["margin"] = saved["head"].pop("loss")
    saved["data"]["normalize"] = saved["data"].pop("input_norm")
    saved["head"]["margin"], saved["data"]["normalize"] = "magface", "imagenet"
    cfg = from_dict(Config, saved, where="old.pt: ")
    assert (cfg.head.loss, cfg.data.input_norm) == ("magface", "imagenet")
    assert (cfg.head.margin, cfg.data.normalize) == ("magface", "imagenet")  # attribute aliases for code


def test_old_and_new_name_with_different_values_is_an_error(tmp_path, fresh_notices):
    both = tmp_path / "both.yaml"
    both.write_text("head:\n  margin: cosface\n  loss: arcface\n")
    with pytest.raises(UserError, match=r"both.yaml: config keys 'head.margin' \(the old name\) and 'head.loss'"):
        load_config(str(both))
    same = tmp_path / "same.yaml"
    same.write_text("head:\n  margin: cosface\n  loss: cosface\n")
    assert load_config(str(same)).head.loss == "cosface"


def test_saved_configs_use_the_new_names():
    text = dump_yaml(load_config(None, ["head.loss=cosface"]))
    assert "loss: cosface" in text and "input_norm:" in text
    assert "margin:" not in text.replace("easy_margin", "") and "normalize:" not in text


def test_synthetic_sizes_have_their_ranges():
    with pytest.raises(UserError, match=r"'data.synthetic.identities' must be an integer in 1..10000000, got 0"):
        load_config(None, ["data.synthetic.identities=0"])
