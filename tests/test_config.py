"""Config schema: inheritance, overrides, type and unknown-key errors with their messages."""
import argparse

import pytest

from conftest import REPO_ROOT
from util.config import FIELDS, SCHEMA, add_config_arguments, load_config, parse_config_args, split_overrides
from util.errors import ConfigError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def base_cfg(tmp_path):
    write(tmp_path / "_base_" / "common.yaml",
          "TRAIN:\n  base_lr: 0.01\n  epochs: 100\n  train_h: 473\n  train_w: 473\n"
          "TEST:\n  scales: [1.0]\n")
    return write(tmp_path / "ds" / "ds_pspnet50.yaml",
                 "_base_: ../_base_/common.yaml\nDATA:\n  data_root: dataset/ds\n  classes: 21\n"
                 "TRAIN:\n  epochs: 50\n  layers: 50\n")


def test_inheritance_merges_and_overrides(base_cfg):
    cfg = load_config(base_cfg)
    assert cfg.epochs == 50          # child wins
    assert cfg.base_lr == 0.01       # from base
    assert cfg.classes == 21
    assert cfg.power == 0.9          # schema default
    assert "ds_pspnet50.yaml line 6" in cfg.source("epochs")


def test_overrides_pairs_and_equals(base_cfg):
    cfg = load_config(base_cfg, ["TRAIN.base_lr", "0.02", "TEST.scales=[0.5, 1.0]", "manual_seed", "7",
                                 "TRAIN.sync_bn", "False", "TEST.save_folder", "exp/x"])
    assert cfg.base_lr == 0.02 and cfg.scales == [0.5, 1.0] and cfg.manual_seed == 7
    assert cfg.sync_bn is False and cfg.save_folder == "exp/x"
    assert cfg.source("base_lr") == "override"
    assert isinstance(cfg.scales[0], float)


def test_unknown_override_suggests_nearest(base_cfg):
    with pytest.raises(ConfigError, match=r"base_lrr.*did you mean base_lr"):
        load_config(base_cfg, ["TRAIN.base_lrr", "0.1"])


def test_unknown_key_in_file_names_file_and_line(tmp_path):
    p = write(tmp_path / "bad.yaml", "DATA:\n  data_root: x\n  classes: 3\nTRAIN:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "bad.yaml line 5" in msg and "TRAIN.momentun" in msg and "momentum" in msg


def test_unknown_section(tmp_path):
    p = write(tmp_path / "bad.yaml", "DATA:\n  data_root: x\n  classes: 3\nTRIAN:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"unknown section 'TRIAN'.*did you mean TRAIN"):
        load_config(p)


def test_key_in_wrong_section(tmp_path):
    p = write(tmp_path / "bad.yaml", "DATA:\n  data_root: x\n  classes: 3\n  test_h: 473\n")
    with pytest.raises(ConfigError, match=r"line 4: key test_h belongs in section TEST"):
        load_config(p)


def test_wrong_type_names_key_type_and_value(base_cfg):
    with pytest.raises(ConfigError, match=r"TRAIN.epochs expects an integer, got 'ten'"):
        load_config(base_cfg, ["TRAIN.epochs", "ten"])
    with pytest.raises(ConfigError, match=r"TRAIN.amp expects a string in off, fp16, bf16, got 'fp8'"):
        load_config(base_cfg, ["TRAIN.amp", "fp8"])


def test_bad_literal_in_override(base_cfg):
    with pytest.raises(ConfigError, match=r"override TEST.scales: cannot parse '\[0.5,' as a YAML literal"):
        load_config(base_cfg, ["TEST.scales", "[0.5,"])


def test_override_without_value(base_cfg):
    with pytest.raises(ConfigError, match=r"override 'TRAIN.epochs' has no value"):
        load_config(base_cfg, ["TRAIN.epochs"])
    assert split_overrides(["a=1", "b", "2"]) == [("a", "1"), ("b", "2")]


@pytest.mark.parametrize("override, message", [
    (["TRAIN.train_h", "470"], r"TRAIN.train_h is 470 \(override\); crop sides must be 8k\+1"),
    (["TEST.scales", "[]"], r"TEST.scales is \[\].*non-empty list of positive scales"),
    (["TEST.scales", "[1.0, -0.5]"], r"TEST.scales.*positive"),
    (["DATA.classes", "1"], r"DATA.classes is 1 \(override\); need at least 2 classes"),
    (["TRAIN.ignore_label", "3"], r"TRAIN.ignore_label is 3.*must not be a class id 0..20"),
])
def test_cross_key_rules(base_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(base_cfg, override)


@pytest.mark.parametrize("side, nearest", [(128, "121 or 129"), (130, "129 or 137"), (4, "9"), (470, "465 or 473")])
def test_a_crop_that_is_not_8k_plus_1_names_the_nearest_valid_sides(base_cfg, side, nearest):
    with pytest.raises(ConfigError, match=rf"TEST.test_w is {side} \(override\); crop sides must be 8k\+1 .*; "
                                          rf"nearest: {nearest}$"):
        load_config(base_cfg, ["TEST.test_w", str(side)])


@pytest.mark.parametrize("raw, value", [("''", ""), ('""', ""), ("'a b.pth'", "a b.pth"), ("it's.pth", "it's.pth"),
                                        ("'x", "'x"), ("plain.pth", "plain.pth")])
def test_quoted_string_overrides_read_as_yaml_literals(base_cfg, raw, value):
    assert load_config(base_cfg, ["TEST.model_path", raw]).model_path == value


def test_missing_required_key(tmp_path):
    p = write(tmp_path / "c.yaml", "DATA:\n  data_root: x\n")
    with pytest.raises(ConfigError, match=r"DATA.classes must be set"):
        load_config(p)


def test_inheritance_loop_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance loops"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "_base_: nothere.yaml\n")
    with pytest.raises(ConfigError, match=r"nothere.yaml does not exist \(named by _base_ in .*c\.yaml\)"):
        load_config(tmp_path / "c.yaml")


def test_a_typo_in_the_config_path_names_the_nearest_shipped_config(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(ConfigError, match=r"config/toy/toy_pspnet\.yaml does not exist; did you mean "
                                          r"config/toy/toy_pspnet18\.yaml"):
        load_config("config/toy/toy_pspnet.yaml")
    with pytest.raises(ConfigError, match=r"did you mean config/ade20k/ade20k_pspnet50\.yaml"):
        load_config("config/ade/ade20k_pspnet50.yaml")


def test_semseg_legacy_keys_are_accepted(tmp_path):
    p = write(tmp_path / "s.yaml", "DATA:\n  data_root: x\n  classes: 3\nDistributed:\n  use_apex: True\n"
                                   "  opt_level: 'O0'\nTRAIN:\n  compact: 0\n")
    cfg = load_config(p)
    assert cfg.compact is False


def test_a_path_key_with_no_value_is_not_set(tmp_path):
    """semseg writes `weight:` and `resume:` for "none"; every path key reads null as its default."""
    p = write(tmp_path / "s.yaml", "DATA:\n  data_root: x\n  classes: 3\n  train_list:\nTRAIN:\n  weight:\n"
                                   "  resume:\n  pretrained_backbone:\n  save_path:\nTEST:\n  model_path: ~\n")
    cfg = load_config(p)
    assert (cfg.train_list, cfg.weight, cfg.resume, cfg.pretrained_backbone, cfg.model_path) == ("",) * 5
    assert cfg.save_path == FIELDS["save_path"].default
    cfg = load_config(p, ["TRAIN.weight", "None", "TRAIN.resume", "null", "TRAIN.pretrained_backbone", "None"])
    assert (cfg.weight, cfg.resume, cfg.pretrained_backbone) == ("", "", "none")  # `none`: the opt-out word
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nTRAIN:\n  pretrained_backbone:\n  weight: None\n")
    write(tmp_path / "base.yaml", "DATA:\n  data_root: x\n  classes: 3\nTRAIN:\n  pretrained_backbone: None\n"
                                  "  weight: w.pth\n")
    cfg = load_config(child)  # no value: the base's stays; `none` for a weight file: not set
    assert (cfg.pretrained_backbone, cfg.weight) == ("none", "")
    assert load_config(child, ["TRAIN.pretrained_backbone", "null"]).pretrained_backbone == ""
    with pytest.raises(ConfigError, match=r"s2.yaml: DATA.data_root must be set"):
        load_config(write(tmp_path / "s2.yaml", "DATA:\n  data_root:\n  classes: 3\n"))
    with pytest.raises(ConfigError, match=r"override DATA.data_root: DATA.data_root must be set .*got no value"):
        load_config(p, ["DATA.data_root", "null"])
    with pytest.raises(ConfigError, match=r"s3.yaml line 4: TRAIN.weight expects a path, got \[1\]"):
        load_config(write(tmp_path / "s3.yaml", "DATA:\n  data_root: x\nTRAIN:\n  weight: [1]\n"))


def test_saved_yaml_round_trips(base_cfg, tmp_path):
    cfg = load_config(base_cfg, ["TRAIN.base_lr", "0.05"])
    cfg.save(tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_schema_has_docs_and_unique_names():
    assert len(FIELDS) == len(SCHEMA)
    assert all(f.doc for f in SCHEMA)


def test_attribute_typo_in_code_is_an_error(base_cfg):
    cfg = load_config(base_cfg)
    with pytest.raises(AttributeError, match="did you mean base_lr"):
        cfg.base_lrr


def test_config_survives_pickling_for_spawned_processes(base_cfg):
    import copy
    import pickle
    cfg = load_config(base_cfg, ["TRAIN.base_lr", "0.02"])
    for clone in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert clone.to_dict() == cfg.to_dict() and clone.source("base_lr") == "override"


def test_options_may_follow_the_overrides_in_every_tool():
    """Every tool reads its command line with parse_config_args: options before, between or after the
    `KEY VALUE` pairs, negative values included (argparse alone would take -1e-3 for an option)."""
    from tool import check_dataset, train
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    add_config_arguments(parser)
    args = parse_config_args(parser, ["--config=c.yaml", "TEST.scales", "[1.0]", "--output", "f.onnx",
                                      "TRAIN.base_lr", "-1e-3", "TRAIN.rotate_min=-5"])
    assert (args.config, args.output) == ("c.yaml", "f.onnx")
    assert split_overrides(args.opts) == [("TEST.scales", "[1.0]"), ("TRAIN.base_lr", "-1e-3"),
                                          ("TRAIN.rotate_min", "-5")]
    checked = check_dataset.parse_args(["--config=c.yaml", "DATA.classes", "3", "--split", "val", "--workers", "1"])
    assert (checked.split, checked.workers, checked.opts) == ("val", 1, ["DATA.classes", "3"])
    assert train.parse_args(["TRAIN.epochs", "2", "--config=c.yaml"]).opts == ["TRAIN.epochs", "2"]
    for tool in ("demo.py", "export.py", "test.py", "train.py", "check_dataset.py"):
        source = (REPO_ROOT / "tool" / tool).read_text()
        assert "parse_config_args(parser" in source and ".parse_args(" not in source.replace("def parse_args(", ""), tool
