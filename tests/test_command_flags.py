"""Flags built from config dataclasses (evaluate, preview, gallery), and one wording of what
differs between settings records (annotate and crops' OUTPUT check, train's and the recipe's)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

import pyarrow as pa
import pytest

from jobs.cli import build_parser, main
from jobs.common.settings import config_from_args, setting_changes, settings_difference
from jobs.output import OutputError, PartsOutput
from jobs.pipelines.evaluate import EvaluateConfig
from jobs.pipelines.gallery import GalleryConfig
from jobs.pipelines.preview import PreviewConfig
from jobs.training.fingerprint import SettingsChanged, differences, refuse_unless_restart
from mtcnn import DetectorConfig

#: command -> (its config class, the least it must be given, every flag it had before its flags
#: were built from the class: none may go).
COMMANDS = {
    "evaluate": (EvaluateConfig, [], [
        "--wider", "--landmarks", "--predictions", "--storage-options", "--weights", "--min-face-size",
        "--thresholds", "--scale-factor", "--pyramid", "--precision", "--device", "--output", "--limit",
        "--batch-size", "--ray", "--address", "--num-gpus", "--concurrency"]),
    "preview": (PreviewConfig, ["RUN", "--out", "PAGES"], [
        "--limit", "--out", "--min-score", "--storage-options"]),
    "gallery": (GalleryConfig, ["CROPS", "--out", "PAGES"], [
        "--out", "--limit", "--no-marks", "--storage-options"]),
}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(only=command)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]


def _options(command: str) -> dict[str, argparse.Action]:
    return {name: action for action in _subparser(command)._actions for name in action.option_strings}


def _cli_fields(cls: type):
    """(field, the field holding it or None) for every field of cls with a flag or a positional."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            inner = dataclasses.fields(hints[f.name])
            wanted = f.metadata.get("fields", [g.name for g in inner])
            yield from ((g, f) for g in inner if g.name in wanted)
        else:
            yield f, None


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _names(f: dataclasses.Field, nested: dataclasses.Field | None) -> list[str]:
    """What --help must show for a field: its metavar (a positional) or its flag(s)."""
    if f.metadata.get("positional"):
        return [f.metadata.get("metavar", f.name.upper())]
    flag = f.metadata.get("flag") if nested is None else None
    flag = flag or "--" + f.name.replace("_", "-")
    names = [flag, *f.metadata.get("aliases", ())]
    if f.type in (bool, "bool") and nested is None:
        names.append("--no-" + flag[2:])
    return names


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_setting_defaults_to_its_dataclass_default(command, tmp_path):
    cls, least, _ = COMMANDS[command]
    args = build_parser(only=command).parse_args([command, *least])
    config = config_from_args(cls, args)
    given = {name for name in vars(args) if not name.startswith("_") and name != "command"}
    for f in dataclasses.fields(cls):
        if f.name in given:
            continue  # what the command cannot run without
        assert getattr(config, f.name) == _default(f), f"{command}: {f.name}"
    for action in _subparser(command)._actions:
        if action.option_strings and action.dest != "help":
            # No default of the flag's own: the dataclass is the one place that holds it.
            assert action.default is argparse.SUPPRESS, f"{command} {action.option_strings}"
    if command == "evaluate":
        assert config == EvaluateConfig() and config.detector == DetectorConfig()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_setting_with_its_dataclass_default(command, capsys):
    cls, _, before = COMMANDS[command]
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    shown = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|[A-Z][A-Z_]+)", text))
    options = _options(command)
    for f, nested in _cli_fields(cls):
        for name in _names(f, nested):
            assert name in shown, f"{command} --help does not list {name} ({f.name})"
        if f.metadata.get("positional") or nested is not None:
            continue
        action = options[_names(f, nested)[0]]
        default = _default(f)
        if f.metadata.get("help"):
            assert action.help.startswith(f.metadata["help"]), f"{command}: {f.name}"
        if default not in (None, dataclasses.MISSING):
            assert action.help.endswith(f"(default {default})"), f"{command}: {f.name}: {action.help}"
    for flag in before:
        assert flag in options, f"{command} lost {flag}"


def test_flags_keep_their_old_names_and_meanings(tmp_path):
    parse = build_parser().parse_args
    evaluate = config_from_args(EvaluateConfig, parse([
        "evaluate", "--wider", "W", "--ray", "--min-face-size", "40", "--limit", "3", "--concurrency", "2",
        "--storage-options", '{"anon": true}', "--batch-size", "1", "--num-gpus", "0.5", "--device", "cuda"]))
    assert (evaluate.wider, evaluate.use_ray, evaluate.limit, evaluate.concurrency, evaluate.batch_size,
            evaluate.num_gpus, evaluate.device) == ("W", True, 3, 2, 1, 0.5, "cuda")
    assert evaluate.detector == DetectorConfig(min_face_size=40) and evaluate.storage_options == {"anon": True}
    gallery = config_from_args(GalleryConfig, parse(["gallery", "C", "--out", "G", "--no-marks", "--limit", "5"]))
    assert (gallery.output, gallery.out_dir, gallery.marks, gallery.limit) == ("C", "G", False, 5)
    preview = config_from_args(PreviewConfig, parse(["preview", "R", "--out", "P", "--min-score", "0.9"]))
    assert (preview.output, preview.out_dir, preview.min_score, preview.limit) == ("R", "P", 0.9, 24)
    # Bad values are input errors: one line, exit status 2.
    for command in (["preview", str(tmp_path), "--out", str(tmp_path / "p"), "--limit", "0"],
                    ["gallery", str(tmp_path), "--out", str(tmp_path / "g"), "--limit", "0"],
                    ["gallery", str(tmp_path), "--out", str(tmp_path / "g"), "--storage-options", "[1]"],
                    ["evaluate", "--wider", str(tmp_path), "--storage-options", "{"]):
        assert main(command) == 2, command
    with pytest.raises(SystemExit):
        parse(["preview", "R"])  # --out is required


# -- one wording of what differs ------------------------------------------------------------------

EARLIER = {"detector": {"min_face_size": 20.0, "thresholds": [0.6, 0.7, 0.7]}, "batch_size": 16,
           "landmark_loss": None}
NOW = {"detector": {"min_face_size": 40.0, "thresholds": [0.5, 0.7, 0.7]}, "batch_size": 16,
       "landmark_weight": 4.0}


def test_settings_difference_names_each_setting_once_with_dotted_keys():
    assert setting_changes(EARLIER, NOW) == [
        "detector.min_face_size 20.0 -> 40.0", "detector.thresholds [0.6, 0.7, 0.7] -> [0.5, 0.7, 0.7]",
        "landmark_loss null -> (none)", "landmark_weight (none) -> 4.0"]
    assert settings_difference(EARLIER, NOW) == ", ".join(setting_changes(EARLIER, NOW))
    assert settings_difference(NOW, NOW) == "unknown"
    assert setting_changes({"a": "x" * 200}, {"a": "y"})[0].endswith('... -> "y"')
    from jobs.output import writer
    assert writer.settings_difference is settings_difference  # one home, on the lowest floor


def _refusal_details(message: str) -> str:
    found = re.search(r"with other settings \((.*)\); pass --restart ", message)
    assert found, message
    return found.group(1)


def test_train_names_differing_settings_as_annotate_and_crops_do(tmp_path):
    # annotate and crops: PartsOutput's check of what OUTPUT holds.
    def output(settings: dict) -> PartsOutput:
        return PartsOutput(str(tmp_path / "out"), {}, b"run", {"settings": settings},
                           settings_of=lambda metadata: metadata["settings"], job="test")

    first = output(EARLIER)
    first.check()
    first.open()
    try:
        first.commit(pa.table({"path": ["a.jpg"]}))
    finally:
        first.close()
    with pytest.raises(OutputError) as annotate_refusal:
        output(NOW).check()
    # train and the recipe: fingerprint's refusal.
    with pytest.raises(SettingsChanged) as train_refusal:
        refuse_unless_restart(EARLIER, NOW, False, "pnet: run 'pnet' in runs/ was started", "train afresh")
    assert _refusal_details(str(annotate_refusal.value)) == _refusal_details(str(train_refusal.value)) \
        == settings_difference(EARLIER, NOW)
    assert "--restart" in str(train_refusal.value) and "--overwrite" in str(annotate_refusal.value)
    # With restart it says what differed, in the same words.
    assert refuse_unless_restart(EARLIER, NOW, True, "", "") == settings_difference(EARLIER, NOW)
    assert differences(EARLIER, NOW) == setting_changes(EARLIER, NOW)
    assert differences(None, NOW) == ["settings of the earlier run unknown (made by an older version)"]


def test_fp16_on_a_cpu_only_annotate_run_is_one_line_naming_what_to_do(tmp_path, capsys):
    # fp16 runs on GPUs only: refused before any Ray starts, not by every CPU actor that builds a detector.
    assert main(["annotate", str(tmp_path), str(tmp_path / "out"), "--precision", "fp16"]) == 2
    error = capsys.readouterr().err.strip()
    assert "fp16" in error and "--num-gpus" in error and len(error.splitlines()) == 1
