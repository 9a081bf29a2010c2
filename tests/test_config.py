"""Run configuration: one TOML file, every key validated by name, exact round trips."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepspm.controller import config as config_module
from deepspm.controller.config import (
    ALL_KEYS,
    KEYS,
    LINKED,
    NOTES,
    RANGES,
    SECTIONS,
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    load_config,
    parse_override,
)
from deepspm.controller.episode import EpisodeConfig, TerminalReward
from deepspm.controller.planner import CentreNorm, PlannerConfig
from deepspm.io.commands import Release
from deepspm.io.instrument import ApproachSettings, DipSettings, FrameOrientation, ScanSettings
from deepspm.io.safety import SafetyLimits

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path | None = None, text: str | None = None, **overrides: object) -> ConfigError:
    path = None if text is None else write(tmp_path, text)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        load_config(path, {k.replace("__", "."): v for k, v in overrides.items()})
    return info.value


# -- defaults and reuse ------------------------------------------------------------------------------------


def test_sections_are_the_consumers_own_dataclasses_with_their_defaults() -> None:
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert type(cfg.safety) is SafetyLimits and cfg.safety == SafetyLimits()
    assert type(cfg.approach) is ApproachSettings and cfg.approach == ApproachSettings()
    assert type(cfg.dip) is DipSettings and cfg.dip == DipSettings()
    assert type(cfg.orientation) is FrameOrientation and cfg.orientation == FrameOrientation()
    assert type(cfg.planner) is PlannerConfig and cfg.planner == PlannerConfig()
    assert type(cfg.episode) is EpisodeConfig and cfg.episode == EpisodeConfig()
    # [scan] is the io layer's ScanSettings (usable as is by NanonisInstrument) plus the run's scanning policy
    assert isinstance(cfg.scan, ScanSettings)
    policy = {"frame_size_m", "bias_V", "setpoint_A", "creep_lines", "creep_skip_below_m", "z_check_lines"}
    assert {f.name for f in dataclasses.fields(cfg.scan)} == {f.name for f in dataclasses.fields(ScanSettings)} | policy
    assert cfg.scan.frame_size_m == 10e-9 and cfg.scan.pixels == 64
    assert (cfg.scan.bias_V, cfg.scan.setpoint_A, cfg.scan.creep_lines) == (-1.0, 25e-12, 30)
    # the values the brief and the reference fix
    assert (cfg.run.seed, cfg.run.frames, cfg.run.hours, cfg.run.train, cfg.run.settle_s) == (0, None, None, False, 120.0)
    assert (cfg.instrument.host, cfg.instrument.port, cfg.instrument.release) == (None, 6501, None)
    assert (cfg.detection.lost_contact_extension, cfg.detection.crash_extension) == (0.95, 0.05)
    assert (cfg.detection.max_consecutive_crashes, cfg.detection.bad_sample_accept_after) == (1, 250)
    assert (cfg.classifier.checkpoint, cfg.classifier.threshold) == ("shipped", 0.9)
    assert (cfg.agent.epsilon, cfg.agent.learn_online, cfg.agent.updates_per_action) == (0.05, True, 4)
    assert (cfg.episode.bad_probe_threshold, cfg.episode.max_episode_actions, cfg.episode.reset_max_actions) == (10, 100, 5)
    assert (cfg.episode.step_reward, cfg.episode.success_reward, cfg.episode.reset_stop_below) == (-1.0, 10.0, 0.1)
    assert cfg.logging.level == "info"


def test_linked_keys_follow_their_owner() -> None:
    cfg = load_config(None, {"run.train": True, "classifier.threshold": 0.8, "scan.frame_size_m": 20e-9,
                             "planner.cell_size_m": 20e-9, "safety.piezo_fraction": 0.9})
    assert cfg.episode.training is True and cfg.episode.good_threshold == 0.8
    assert cfg.planner.frame_size_m == 20e-9 and cfg.planner.envelope_fraction == 0.9
    for dependent in LINKED:
        section, name = dependent.split(".")
        assert name in {f.name for f in dataclasses.fields(SECTIONS[section])}
        assert name not in KEYS[section]  # not settable in its own section


def test_release_override_maps_to_the_io_enum() -> None:
    assert load_config(None, {"instrument.release": "R13742"}).instrument.release_enum is Release.R13742
    assert load_config(None).instrument.release_enum is None


# -- the tables --------------------------------------------------------------------------------------------


def _numeric(tp: object) -> bool:
    args = typing.get_args(tp)
    return tp in (int, float) or any(_numeric(a) for a in args)


def test_every_numeric_key_has_a_range_and_every_key_a_note() -> None:
    for section, keys in KEYS.items():
        for name, spec in keys.items():
            dotted = f"{section}.{name}"
            if _numeric(spec.type):
                assert dotted in RANGES, f"{dotted} has no range"
            assert dotted in NOTES, f"{dotted} has no note"
            if type(None) in typing.get_args(spec.type):
                assert spec.default is None, f"optional {dotted} must default to unset (None) to round-trip"
    assert set(RANGES) <= set(ALL_KEYS) and set(NOTES) <= set(ALL_KEYS)


def test_every_default_is_inside_its_range() -> None:
    for dotted in ALL_KEYS:
        section, name = dotted.split(".")
        config_module._check_range(dotted, getattr(getattr(RunConfig(), section), name))


# -- round trips -------------------------------------------------------------------------------------------

NON_DEFAULT = {
    "run.seed": 4_000_000_000, "run.frames": 300, "run.hours": 1.5, "run.train": True, "run.settle_s": 0,
    "run.time_scale": 0.25, "run.out": "runs/lab 7/ü",
    "instrument.host": "stm-pc.lab", "instrument.port": 6502, "instrument.release": "R10862",
    "instrument.command_timeout_s": 2.5,
    "scan.pixels": 128, "scan.fwd_speed_mps": 1e-7, "scan.z_channel_name": 'Z "raw"\\ (m)\ttab', "scan.scan_up": False,
    "scan.frame_size_m": 20e-9,
    "approach.target_extension": 0.7, "approach.area_move_steps": 42,
    "dip.end_wait_s": 0.3, "orientation.acquisition_order": False,
    "safety.bias_max_V": 7.5, "safety.allow_unchecked": ["ZCtrl.GainSet", "Bias.RangeSet"],
    "planner.piezo_range_xy_m": [800e-9, 600e-9], "planner.cell_size_m": 20e-9, "planner.centre_norm": "chebyshev",
    "planner.alpha": 0.1 + 0.2,
    "episode.bad_probe_threshold": 11, "episode.terminal_reward": "code",
    "detection.crash_extension": 0.1, "detection.bad_sample_accept_after": 3,
    "classifier.checkpoint": "/data/ckpt/classifier", "classifier.threshold": 0.95,
    "agent.checkpoint": "C:\\ckpt\\agent", "agent.epsilon": 0.0, "agent.learn_online": False,
    "agent.updates_per_action": 0, "logging.level": "debug",
}


def test_default_round_trips_through_toml_and_dict(tmp_path: Path) -> None:
    cfg = RunConfig()
    assert load_config(write(tmp_path, config_to_toml(cfg))) == cfg
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_non_default_round_trips_through_toml_and_dict(tmp_path: Path) -> None:
    cfg = load_config(None, NON_DEFAULT)
    for dotted, value in NON_DEFAULT.items():  # every override took effect
        section, name = dotted.split(".")
        got = config_to_dict(cfg)[section][name]
        assert got == (sorted(value) if isinstance(value, list) and isinstance(value[0], str) else value), dotted
    assert cfg.planner.centre_norm is CentreNorm.CHEBYSHEV and cfg.episode.terminal_reward is TerminalReward.CODE
    assert cfg.safety.allow_unchecked == frozenset({"ZCtrl.GainSet", "Bias.RangeSet"})
    text = config_to_toml(cfg)
    assert load_config(write(tmp_path, text)) == cfg
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert tomllib.loads(text)["run"]["out"] == "runs/lab 7/ü"
    assert "# release = (unset)" not in text and "# hours = (unset)" not in text
    assert "# frames = (unset)" in config_to_toml(RunConfig())  # unset keys are comments, not values


@settings(max_examples=60, deadline=None)
@given(
    name=st.text(min_size=1, max_size=30),
    hours=st.floats(min_value=1e-9, max_value=24 * 365),
    ranges=st.tuples(st.floats(min_value=1e-9, max_value=1e-3), st.floats(min_value=1e-9, max_value=1e-3)),
    allowed=st.sets(st.sampled_from(["ZCtrl.GainSet", "Bias.RangeSet", "Util.SessionPathSet", "Motor.FreqAmpSet"])),
)
def test_any_string_and_float_round_trips_exactly(
    name: str, hours: float, ranges: tuple[float, float], allowed: set[str]
) -> None:
    cfg = load_config(None, {"scan.z_channel_name": name, "run.hours": hours, "planner.piezo_range_xy_m": list(ranges),
                             "safety.allow_unchecked": sorted(allowed), "classifier.checkpoint": name})
    text = config_to_toml(cfg)
    assert config_module._build(tomllib.loads(text), {}) == cfg


def test_example_file_is_up_to_date() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == config_to_toml(RunConfig()), (
        "regenerate: .venv/bin/python -m deepspm.controller.config > docs/config.example.toml")


# -- errors name the key -----------------------------------------------------------------------------------


def test_unknown_key_names_it_and_suggests(tmp_path: Path) -> None:
    e = error_of(tmp_path, "[scan]\npixls = 64\n")
    assert e.key == "scan.pixls"
    assert "unknown key 'scan.pixls' (did you mean 'pixels'?)" in str(e)
    assert str(tmp_path / "run.toml") in str(e)


def test_unknown_section_names_it_and_suggests(tmp_path: Path) -> None:
    e = error_of(tmp_path, "[scn]\npixels = 64\n")
    assert e.key == "scn" and "unknown section 'scn' (did you mean 'scan'?)" in str(e)


def test_key_in_the_wrong_place_points_to_the_right_one(tmp_path: Path) -> None:
    assert "did you mean 'run.seed'?" in str(error_of(tmp_path, "seed = 3\n"))
    e = error_of(tmp_path, "[run]\npixels = 64\n")
    assert e.key == "run.pixels" and "did you mean 'scan.pixels'?" in str(e)


def test_linked_key_names_its_owner(tmp_path: Path) -> None:
    e = error_of(tmp_path, "[planner]\nframe_size_m = 2e-8\n")
    assert e.key == "planner.frame_size_m" and "'scan.frame_size_m'" in str(e)
    assert "'run.train'" in str(error_of(**{"episode__training": True}))


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ('[scan]\npixels = "64"', "scan.pixels", "must be an integer, got '64' (a string)"),
        ("[scan]\npixels = 64.0", "scan.pixels", "must be an integer"),
        ("[scan]\npixels = true", "scan.pixels", "must be an integer, got True (a boolean)"),
        ("[run]\ntrain = 1", "run.train", "must be true or false"),
        ("[run]\nsettle_s = \"2 min\"", "run.settle_s", "must be a number"),
        ("[scan]\nframe_size_m = nan", "scan.frame_size_m", "must be a finite number"),
        ("[instrument]\nhost = 127", "instrument.host", "must be a string"),
        ("[instrument]\nhost = \"\"", "instrument.host", "must not be empty"),
        ("[planner]\npiezo_range_xy_m = 8.5e-7", "planner.piezo_range_xy_m", "must be an array of 2 numbers"),
        ("[planner]\npiezo_range_xy_m = [8.5e-7, \"x\"]", "planner.piezo_range_xy_m[1]", "must be a number"),
        ("[safety]\nallow_unchecked = \"ZCtrl.GainSet\"", "safety.allow_unchecked", "must be an array of strings"),
        ("[planner]\ncentre_norm = \"euclid\"", "planner.centre_norm", "one of 'manhattan', 'chebyshev'"),
        ("[scan]\npixels = { a = 1 }", "scan.pixels", "(a table)"),
        ("scan = 3", "scan", "must be a section"),
    ],
)
def test_wrong_types_name_the_key(tmp_path: Path, toml: str, key: str, expected: str) -> None:
    e = error_of(tmp_path, toml)
    assert e.key == key and key in str(e) and expected in str(e)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("scan.pixels", 4, "allowed 8..1024"),
        ("scan.pixels", 1025, "allowed 8..1024"),
        ("instrument.port", 0, "allowed 1..65535"),
        ("run.hours", 0, "allowed 0 < hours <= 8760"),
        ("run.seed", -1, "allowed 0..4294967295"),
        ("classifier.threshold", 1.0, "allowed 0 < threshold < 1"),
        ("agent.epsilon", 1.5, "allowed 0..1"),
        ("planner.piezo_range_xy_m", [8.5e-7, -1e-9], "allowed 0 < piezo_range_xy_m <= 0.001"),
        ("logging.level", "infoo", "(did you mean 'info'?): allowed one of 'debug', 'info'"),
        ("instrument.release", "R99", "allowed one of 'R10862', 'R13742', 'R14718'"),
        ("safety.allow_unchecked", ["ZCtrl.GainSett"], "(did you mean 'ZCtrl.GainSet'?)"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(tmp_path: Path, key: str, value: object, allowed: str) -> None:
    section, name = key.split(".")
    toml = f"[{section}]\n{name} = {json.dumps(value)}\n"
    for e in (error_of(tmp_path, toml), error_of(**{key.replace(".", "__"): value})):
        assert e.key == key and key in str(e) and allowed in str(e)


def test_range_ends_are_open_or_closed_as_declared() -> None:
    assert load_config(None, {"scan.pixels": 8}).scan.pixels == 8
    assert load_config(None, {"scan.pixels": 1024, "safety.pixels_max": 1024}).scan.pixels == 1024
    assert load_config(None, {"agent.epsilon": 0}).agent.epsilon == 0.0
    error_of(**{"classifier__threshold": 0.0})
    assert load_config(None, {"run.hours": 1e-9}).run.hours == 1e-9


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        ({"scan.pixls": 64}, "scan.pixls", "unknown key 'scan.pixls' (did you mean 'pixels'?)"),
        ({"pixels": 64}, "pixels", "must be 'section.key' (did you mean 'scan.pixels'?)"),
        ({"scna.pixels": 64}, "scna.pixels", "unknown section 'scna' in 'scna.pixels' (did you mean 'scan'?)"),
        ({"scan.pixels": "many"}, "scan.pixels", "must be an integer"),
        ({"scan.pixels": None}, "scan.pixels", "cannot be unset"),
        ({"run.frames": 0}, "run.frames", "allowed 1..1000000000"),
    ],
)
def test_bad_overrides_name_the_key(overrides: dict, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key and expected in str(info.value)


def test_overrides_win_over_the_file_and_unset_optional_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[run]\nframes = 10\nseed = 5\n")
    cfg = load_config(path, {"run.frames": None, "run.seed": 6})
    assert (cfg.run.frames, cfg.run.seed) == (None, 6)


def test_parse_override_reads_toml_values_or_bare_strings() -> None:
    assert parse_override("scan.pixels=128") == ("scan.pixels", 128)
    assert parse_override("run.train = true") == ("run.train", True)
    assert parse_override("instrument.host=10.0.0.2") == ("instrument.host", "10.0.0.2")
    assert parse_override('scan.z_channel_name="Z (m)"') == ("scan.z_channel_name", "Z (m)")
    assert parse_override('safety.allow_unchecked=["ZCtrl.GainSet"]') == ("safety.allow_unchecked", ["ZCtrl.GainSet"])
    cfg = load_config(None, dict([parse_override("run.hours=2"), parse_override("logging.level=debug")]))
    assert cfg.run.hours == 2.0 and isinstance(cfg.run.hours, float) and cfg.logging.level == "debug"
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("scan.pixels")
    with pytest.raises(ConfigError, match="did you mean 'pixels'"):
        parse_override("scan.pixls=3")


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        ({"scan.pixels": 512, "safety.pixels_max": 256}, ("scan.pixels", "safety.pixels_max")),
        ({"scan.frame_size_m": 150e-9, "planner.cell_size_m": 150e-9, "safety.frame_size_max_m": 100e-9},
         ("scan.frame_size_m", "safety.frame_size_max_m")),
        ({"scan.fwd_speed_mps": 5e-7, "safety.scan_speed_max_mps": 2e-7}, ("scan.fwd_speed_mps", "safety.scan_speed_max_mps")),
        ({"approach.area_move_steps": 400, "safety.coarse_steps_max": 100},
         ("approach.area_move_steps", "safety.coarse_steps_max")),
        ({"dip.end_wait_s": 3.0, "safety.tip_shaper_time_max_s": 2.0}, ("dip.end_wait_s", "safety.tip_shaper_time_max_s")),
        ({"approach.target_extension": 0.9}, ("approach.target_extension", "detection.lost_contact_extension")),
        ({"detection.crash_extension": 0.75}, ("approach.target_extension", "detection.crash_extension")),
        ({"safety.pixels_min": 64, "safety.pixels_max": 32}, ("safety.pixels_min", "safety.pixels_max")),
        ({"scan.frame_size_m": 20e-9}, ("planner.cell_size_m", "scan.frame_size_m")),
        ({"approach.towards_sample_direction": 4}, ("approach.towards_sample_direction", "approach.away_from_sample_direction")),
    ],
)
def test_inconsistent_sections_name_every_key_involved(overrides: dict, keys: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for key in keys:
        assert key in str(info.value)
    assert info.value.key in keys


def test_unreadable_or_invalid_files_name_the_file(tmp_path: Path) -> None:
    e = error_of(tmp_path, "[run\n")
    assert "not valid TOML" in str(e) and str(tmp_path / "run.toml") in str(e)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    e = error_of(tmp_path, "[run]\nseed = 1\nseed = 2\n")  # TOML itself forbids duplicates
    assert "not valid TOML" in str(e)


def test_config_to_dict_is_json_and_has_every_key() -> None:
    d = config_to_dict(load_config(None, NON_DEFAULT))
    assert json.loads(json.dumps(d)) == d
    assert sorted(f"{s}.{k}" for s, keys in d.items() for k in keys) == sorted(ALL_KEYS)
