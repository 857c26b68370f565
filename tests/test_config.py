from pathlib import Path

import pytest
import yaml
from conftest import REPO

from bonetumor.config import Config, load_config, save_resolved
from bonetumor.errors import ConfigError


def test_params_yaml_mirrors_the_dataclass_defaults() -> None:
    # params.yaml and the dataclasses are two spellings of one config: they must not drift apart.
    assert load_config(REPO / "params.yaml") == Config()


def test_unknown_field_and_out_of_range_value_are_both_named() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"train": {"steps": 0, "stepz": 3}}, source="params.yaml")
    message = str(info.value)
    assert "params.yaml" in message
    assert "train.steps" in message
    assert "train.stepz" in message


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        ({"train": {"epochs": 6}}, r"train\.epochs: replaced by steps"),
        ({"train": {"head_epochs": 2}}, r"train\.head_epochs: replaced by head_steps"),
        ({"preprocess": {"image_size": 128}}, r"preprocess\.image_size: replaced by tile_size .* and input_size"),
        ({"candidates": {"prune_finetune_epochs": 2}}, r"prune_finetune_steps"),
    ],
)
def test_settings_of_an_older_params_yaml_say_what_replaced_them(raw: dict[str, dict[str, object]], hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        Config.from_dict(raw, source="params.yaml")


def test_per_arch_overrides_apply_to_that_architecture_only() -> None:
    config = Config.from_dict({"train": {"lr": 0.002, "per_arch": {"vgg19": {"lr": 0.0005, "input_size": 32}}}})
    vgg = config.for_arch("vgg19")
    assert (vgg.train.lr, vgg.preprocess.input_size) == (0.0005, 32)
    assert vgg.preprocess.tile_size == config.preprocess.tile_size
    assert config.for_arch("resnet50") is config


@pytest.mark.parametrize(
    ("per_arch", "message"),
    [
        ({"alexnet": {"lr": 0.1}}, r"per_arch: unknown architecture 'alexnet'"),
        ({"vgg19": {"optimizer": "sgd"}}, r"per_arch\.vgg19: unknown setting\(s\) \['optimizer'\]"),
        ({"vgg19": {"lr": -1}}, r"train\.per_arch\.vgg19: lr: .*greater than 0"),
        ({"vgg19": {"input_size": 512}}, r"train\.per_arch\.vgg19: .*input_size=512 is larger than tile_size"),
    ],
)
def test_per_arch_mistakes_are_named_at_load_time(per_arch: dict[str, dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"train": {"per_arch": per_arch}})


def test_unknown_section_lists_the_expected_sections() -> None:
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\].*'train'"):
        Config.from_dict({"trian": {}})


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"alexnet.*resnet50.*vgg19"):
        Config.from_dict({"train": {"architectures": ["alexnet"]}})


def test_frozen_layers_without_pretrained_weights_is_rejected() -> None:
    with pytest.raises(ConfigError, match="trainable='head'"):
        Config.from_dict({"train": {"trainable": "head", "weights": "none"}})
    assert Config.from_dict({"train": {"trainable": "head", "weights": "imagenet"}}).train.trainable == "head"


def test_duplicate_classes_are_rejected() -> None:
    with pytest.raises(ConfigError, match="unique"):
        Config.from_dict({"data": {"classes": ["a", "a"]}})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = Config.from_dict({"split": {"n_folds": 4}})
    written = save_resolved(config, tmp_path)
    assert Config.from_dict(yaml.safe_load(written.read_text())) == config
    only = save_resolved(config, tmp_path / "x", ("split",))
    assert set(yaml.safe_load(only.read_text())) == {"split"}


def test_section_hash_changes_only_with_its_sections() -> None:
    base = Config()
    changed = Config.from_dict({"train": {"steps": 2}})
    assert base.section_hash("split") == changed.section_hash("split")
    assert base.section_hash("train") != changed.section_hash("train")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"balance": {"batch_size": 1}}, "balance.batch_size"),  # the generator's batch norm needs 2
        ({"preprocess": {"input_size": 16}}, "preprocess.input_size"),  # VGG19 pools 5 times
        ({"preprocess": {"tile_size": 64, "input_size": 96}}, "input_size=96 is larger than tile_size=64"),
        ({"train": {"batch_size": 1}}, "train.batch_size"),  # batch norm needs 2
        ({"referral": {"confidence": 0.2}}, "referral.confidence"),
        ({"train": {"inner_val_fraction": 0.8}}, "train.inner_val_fraction"),
    ],
)
def test_values_that_would_crash_later_are_refused_up_front(raw: dict[str, dict[str, object]], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Config.from_dict(raw)
