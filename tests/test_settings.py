"""Settings declared once: flags built from the config dataclasses, YAML under the flags."""

from __future__ import annotations

import argparse

import pytest

from jobs.cli import build_parser
from jobs.common.settings import add_config_arguments, config_from_args
from jobs.training.prepare_stage import MINING_DETECTOR, PrepareConfig
from jobs.training.samples import SampleConfig


def _prepare(argv):
    args = build_parser("prepare").parse_args(["prepare", *argv])
    return config_from_args(PrepareConfig, args, args.config, required=("samples.stage", "output"))


def test_prepare_flags_default_to_the_dataclasses(tmp_path):
    config = _prepare(["--stage", "pnet", "--faces", "a_bbx_gt.txt", "b.xml", "--output", str(tmp_path)])
    assert config.samples == SampleConfig(stage="pnet")
    assert config.mining == MINING_DETECTOR and config.augment is not None
    assert config.faces == ["a_bbx_gt.txt", "b.xml"] and not config.overwrite


def test_prepare_yaml_sets_defaults_and_flags_override_it(tmp_path):
    recipe = tmp_path / "prepare.yaml"
    recipe.write_text("output: out\nfaces: a_bbx_gt.txt\nseed: 3\n"
                      "samples: {stage: rnet, negative_iou: 0.3, mix: [3, 1, 1, 1]}\n"
                      "mining: {min_face_size: 24}\naugment: {max_rotation: 10}\nweights: w.safetensors\n")
    config = _prepare(["--config", str(recipe)])
    assert (config.output, config.seed, config.stage) == ("out", 3, "rnet")
    assert config.samples.negative_iou == 0.3 and config.samples.mix == (3.0, 1.0, 1.0, 1.0)
    assert config.mining.min_face_size == 24 and config.mining.pyramid == MINING_DETECTOR.pyramid
    assert config.augment.max_rotation == 10 and config.augment.probability == 0.5
    config = _prepare(["--config", str(recipe), "--negative-iou", "0.35", "--seed", "4", "--no-augment",
                       "--mining-thresholds", "0.5,0.6,0.7", "--pyramid", "classic"])
    assert config.samples.negative_iou == 0.35 and config.samples.stage == "rnet" and config.seed == 4
    assert config.augment is None
    assert config.mining.thresholds == (0.5, 0.6, 0.7) and config.mining.pyramid == "classic"
    assert config.mining.min_face_size == 24


def test_prepare_settings_errors(tmp_path):
    with pytest.raises(ValueError, match="--stage"):
        _prepare(["--faces", "a_bbx_gt.txt", "--output", "out"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: out\nsamples: {stage: pnet, negative_iuo: 0.3}\n")
    with pytest.raises(ValueError, match="negative_iuo"):
        _prepare(["--config", str(bad), "--faces", "a_bbx_gt.txt"])
    with pytest.raises(SystemExit):  # a tuple of four numbers, checked as it is parsed
        _prepare(["--stage", "pnet", "--mix", "3,1", "--output", "out"])


def test_a_new_setting_is_one_field():
    from dataclasses import dataclass, field

    @dataclass
    class Example:
        rate: float = field(default=0.5, metadata={"help": "how fast"})
        on: bool = False
        pair: tuple[int, int] = (1, 2)

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example)
    assert "how fast (default 0.5)" in parser.format_help()
    assert config_from_args(Example, parser.parse_args(["--on", "--pair", "3,4"])) == Example(0.5, True, (3, 4))


def _train_args(argv):
    return build_parser("train").parse_args(["train", *argv])


def test_train_flags_default_to_train_config(tmp_path):
    from jobs.training.trainer import TrainConfig

    args = _train_args(["--stage", "rnet", "--data", "d", "--output", "o", "--flip", "--workers", "1",
                        "--batch-size", "64"])
    config = config_from_args(TrainConfig, args)
    assert config == TrainConfig(stage="rnet", data="d", output="o", flip=True, num_workers=1, batch_size=64)


def test_train_recipe_yaml_sets_defaults_and_flags_override_every_stage(tmp_path, monkeypatch):
    from jobs.commands import train
    from jobs.training import recipe

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("faces: wider\nnum_workers: 2\nstages:\n"
                           "  pnet: {epochs: 14, learning_rate_decay: 0.85, negative_iou: 0.3}\n"
                           "  rnet: {epochs: 12}\n")
    seen = {}
    def fake_run(config, output, restart=False):
        seen["run"] = (config, output)
        seen["restart"] = restart
        return recipe.RecipeSummary("weights.safetensors", {}, 0.0)

    monkeypatch.setattr(recipe, "run_recipe", fake_run)
    monkeypatch.setattr(train, "init_ray", lambda *a, **k: None)
    args = _train_args(["--config", str(recipe_file), "--output", str(tmp_path / "run")])
    assert train.run(args) == 0
    config, output = seen.pop("run")
    assert output == str(tmp_path / "run") and config.num_workers == 2
    assert config.stages["pnet"].epochs == 14 and config.stages["rnet"].epochs == 12
    assert config.stages["pnet"].samples("pnet").negative_iou == 0.3
    assert config.stages["rnet"].learning_rate_decay == 1.0  # TrainConfig's default: one schema
    args = _train_args(["--config", str(recipe_file), "--output", "run", "--epochs", "1", "--workers", "1",
                        "--limit", "4", "--no-augment"])
    assert train.run(args) == 0
    config, _ = seen.pop("run")
    assert [s.epochs for s in config.stages.values()] == [1, 1]
    assert config.stages["pnet"].learning_rate_decay == 0.85  # not given: the file's value stays
    assert config.num_workers == 1 and config.limit == 4 and config.augment is False


def test_a_training_setting_declared_once_reaches_flags_yaml_and_stages(tmp_path):
    """label_smoothing is one TrainConfig field: the flag, the recipe key and the check come with it."""
    from jobs.training.recipe import TRAIN_KEYS, load_recipe
    from jobs.training.trainer import TrainConfig

    args = _train_args(["--stage", "pnet", "--data", "d", "--output", "o", "--label-smoothing", "0.1"])
    assert config_from_args(TrainConfig, args).label_smoothing == 0.1
    assert "label_smoothing" in TRAIN_KEYS
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("faces: wider\nstages:\n  pnet: {label_smoothing: 0.05}\n")
    assert load_recipe(recipe_file).stages["pnet"].training() == {"label_smoothing": 0.05}
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(stage="pnet", data="d", output="o", label_smoothing=1.5)
