"""Settings declared once: flags built from the config dataclasses, YAML under the flags."""

from __future__ import annotations

import argparse

import pytest

from jobs.cli import build_parser
from jobs.settings import add_config_arguments, config_from_args
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
