"""Typed configs: layering, override parsing, every error kind, validate(), dump/hash round trips."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from pipeline.config import ConfigError, config_hash, dump_config, load_config, merge_overrides, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: Optional[int] = None


@dataclass
class Data:
    shards: str
    resolution: int = 64
    crop: Literal["center", "random"] = "center"

    def validate(self) -> None:
        if not 32 <= self.resolution <= 256:
            raise ValueError(f"resolution must be between 32 and 256, got {self.resolution}")


@dataclass
class Sampler:
    steps: int = 50
    kind: Optional[Literal["ddim", "euler"]] = None


@dataclass
class Run:
    data: Data
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=lambda: ["base"])
    extra: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    ema: bool = False
    note: str | None = None
    anything: Any = None
    sampler: Optional[Sampler] = None


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / "configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# --- layering and parsing ---------------------------------------------------------------


def test_defaults_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "data:\n  shards: a/{000..009}.tar\n  resolution: 128\noptim:\n  lr: 0.01\n")
    cfg = load_config(Run, path, ["optim.lr=3e-4"])
    assert cfg.data == Data(shards="a/{000..009}.tar", resolution=128, crop="center")
    assert cfg.optim == Optim(lr=3e-4)  # the override beats the file; other optim fields keep defaults
    assert cfg.tags == ["base"] and cfg.seed == 0


def test_base_sits_between_defaults_and_file(tmp_path):
    path = write(tmp_path, "data: {shards: s}\noptim: {lr: 0.5}\n")
    cfg = load_config(Run, path, base={"optim": {"lr": 0.1, "schedule": "constant"}, "seed": 7})
    assert cfg.optim.lr == 0.5 and cfg.optim.schedule == "constant" and cfg.seed == 7


def test_overrides_without_file():
    cfg = load_config(Run, overrides=["data.shards=s", "data.resolution=32", "tags=[a, b]", "ema=true"])
    assert cfg.data.resolution == 32 and type(cfg.data.resolution) is int
    assert cfg.tags == ["a", "b"] and cfg.ema is True


def test_override_value_types():
    overrides = ["data.shards=s", "optim.lr=3e-4", "optim.betas=[0.5, 1]", "note=hi=there"]
    cfg = load_config(Run, overrides=overrides)
    assert cfg.optim.lr == 3e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.betas == (0.5, 1.0) and all(type(b) is float for b in cfg.optim.betas)
    assert cfg.note == "hi=there"  # only the first '=' splits


def test_mappings_merge_and_lists_replace(tmp_path):
    path = write(tmp_path, "data: {shards: s}\nextra: {a: 1}\ntags: [x, y]\n")
    cfg = load_config(Run, path, ["extra.b=2", "tags=[z]"])
    assert cfg.extra == {"a": 1, "b": 2}
    assert cfg.tags == ["z"]


def test_optional_and_any(tmp_path):
    cfg = load_config(Run, overrides=["data.shards=s", "optim.warmup=100", "anything={k: [1, 2]}"])
    assert cfg.optim.warmup == 100 and cfg.anything == {"k": [1, 2]}
    assert load_config(Run, overrides=["data.shards=s", "optim.warmup=null"]).optim.warmup is None


def test_optional_nested_dataclass_is_built_from_overrides():
    assert load_config(Run, overrides=["data.shards=s"]).sampler is None
    assert load_config(Run, overrides=["data.shards=s", "sampler.steps=10"]).sampler == Sampler(steps=10)
    message = error(Run, overrides=["data.shards=s", "sampler.steps=many"])
    assert message == "command line: key 'sampler.steps' expects int, got str 'many'"
    message = error(Run, overrides=["data.shards=s", "sampler.kind=heun"])
    assert message == (
        "command line: key 'sampler.kind' expects (one of 'ddim', 'euler') | None, got str 'heun'"
    )
    message = error(Run, overrides=["data.shards=s", "sampler=3"])
    assert message == "command line: key 'sampler' expects Sampler | None, got int 3"


def test_empty_file_sets_nothing(tmp_path):
    assert load_config(Run, write(tmp_path, ""), ["data.shards=s"]).optim == Optim()


def test_merge_overrides_helper():
    raw = {"optim": {"lr": 1.0, "betas": [0.9, 0.9]}}
    merged = merge_overrides(raw, ["optim.lr=2", "data.shards=s"])
    assert merged == {"optim": {"lr": 2, "betas": [0.9, 0.9]}, "data": {"shards": "s"}}
    assert raw["optim"]["lr"] == 1.0  # the input is left alone


# --- errors: key, source and expected type ----------------------------------------------


def test_unknown_key_in_file_suggests_nearest(tmp_path):
    path = write(tmp_path, "data: {shards: s}\noptim:\n  lrr: 0.1\n")
    assert error(Run, path) == f"{path}: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"


def test_unknown_key_without_close_match_has_no_hint(tmp_path):
    path = write(tmp_path, "data: {shards: s}\nzzzzzz: 1\n")
    assert error(Run, path) == f"{path}: unknown key 'zzzzzz'"


def test_unknown_key_in_override_names_command_line(tmp_path):
    path = write(tmp_path, "data: {shards: s}\n")
    assert error(Run, path, ["data.resoluton=32"]) == (
        "command line: unknown key 'data.resoluton' (did you mean 'data.resolution'?)"
    )


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, "data: {shards: s}\noptim: {lr: fast}\n")
    assert error(Run, path) == f"{path}: key 'optim.lr' expects float, got str 'fast'"


def test_wrong_type_names_the_layer_that_set_it(tmp_path):
    path = write(tmp_path, "data: {shards: s, resolution: 64}\n")
    message = error(Run, path, ["data.resolution=big"])
    assert message == "command line: key 'data.resolution' expects int, got str 'big'"


def test_int_rejects_bool_and_floats(tmp_path):
    path = write(tmp_path, "data: {shards: s, resolution: true}\n")
    assert error(Run, path) == f"{path}: key 'data.resolution' expects int, got bool True"
    message = error(Run, overrides=["data.shards=s", "data.resolution=64.0"])
    assert message == "command line: key 'data.resolution' expects int, got float 64.0"


def test_float_rejects_bool():
    message = error(Run, overrides=["data.shards=s", "optim.lr=true"])
    assert message == "command line: key 'optim.lr' expects float, got bool True"


def test_literal_lists_allowed_values():
    message = error(Run, overrides=["data.shards=s", "optim.schedule=linear"])
    assert message == (
        "command line: key 'optim.schedule' expects one of 'cosine', 'constant', got str 'linear'"
    )


def test_nested_dataclass_given_scalar_expects_mapping(tmp_path):
    path = write(tmp_path, "data: {shards: s}\noptim: 3\n")
    assert error(Run, path) == f"{path}: key 'optim' expects a mapping (Optim), got int 3"


def test_container_errors_name_the_element(tmp_path):
    path = write(tmp_path, "data: {shards: s}\noptim: {betas: [0.9, x]}\n")
    assert error(Run, path) == f"{path}: key 'optim.betas[1]' expects float, got str 'x'"
    path = write(tmp_path, "data: {shards: s}\noptim: {betas: [0.9]}\n")
    assert error(Run, path) == f"{path}: key 'optim.betas' expects tuple[float, float], got list [0.9]"
    message = error(Run, overrides=["data.shards=s", "extra={a: one}"])
    assert message == "command line: key 'extra.a' expects int, got str 'one'"
    message = error(Run, overrides=["data.shards=s", "extra={1: 2}"])
    assert message == "command line: key 'extra' expects dict[str, int], got dict {1: 2}"
    message = error(Run, overrides=["data.shards=s", "tags=solo"])
    assert message == "command line: key 'tags' expects list[str], got str 'solo'"


def test_optional_error_names_full_type():
    message = error(Run, overrides=["data.shards=s", "optim.warmup=soon"])
    assert message == "command line: key 'optim.warmup' expects int | None, got str 'soon'"


def test_missing_required_value(tmp_path):
    path = write(tmp_path, "optim: {lr: 0.1}\n")
    assert error(Run, path) == f"{path}: missing required value 'data.shards' (expected str)"
    assert error(Run) == "<defaults>: missing required value 'data.shards' (expected str)"
    message = error(Run, overrides=["seed=1"])
    assert message == "command line: missing required value 'data.shards' (expected str)"


def test_null_for_required_nested_dataclass(tmp_path):
    path = write(tmp_path, "data: null\n")
    assert error(Run, path) == f"{path}: key 'data' expects a mapping (Data), got null"


@pytest.mark.parametrize("item", ["optim.lr", "=3", "optim..lr=3"])
def test_malformed_override(item):
    assert error(Run, overrides=[item]) == f"command line: override {item!r} must look like key=value"


def test_override_with_invalid_yaml_value():
    message = error(Run, overrides=["data.shards=s", "tags=[a, b"])
    assert message.startswith("command line: key 'tags': value '[a, b' is not valid YAML")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "data:\n  shards: s\noptim: {lr: 0.1\n")
    message = error(Run, path)
    assert message.startswith(f"{path}: invalid YAML at line ")


def test_top_level_must_be_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    assert error(Run, path) == f"{path}: top level must be a mapping of keys to values, got list ['a', 'b']"


def test_file_not_found(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error(Run, path) == f"{path}: cannot read config file (No such file or directory)"


def test_validate_error_names_key_and_source(tmp_path):
    path = write(tmp_path, "data: {shards: s, resolution: 512}\n")
    assert error(Run, path) == (
        f"{path}: invalid key 'data' (Data): resolution must be between 32 and 256, got 512"
    )
    message = error(Run, path, ["data.resolution=16"])
    assert message.startswith(f"{path} + command line: invalid key 'data' (Data): resolution must be")


@dataclass
class Child:
    n: int = 1

    def validate(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")


@dataclass
class Parent:
    child: Child = field(default_factory=Child)

    def validate(self) -> None:
        if self.child.n == 0:
            raise ValueError("parent rejects n == 0")


def test_validate_runs_children_first_and_root_is_named_config():
    message = error(Parent, overrides=["child.n=-1"])
    assert message == "command line: invalid key 'child' (Child): n must be >= 0"
    message = error(Parent, overrides=["child.n=0"])
    assert message == "command line: invalid config (Parent): parent rejects n == 0"


def test_schema_must_be_dataclass_and_overrides_a_list():
    with pytest.raises(TypeError):
        load_config(dict)
    with pytest.raises(TypeError):
        load_config(Run, overrides="data.shards=s")


# --- dump, round trip, hash -------------------------------------------------------------


def test_dump_then_load_round_trips(tmp_path):
    overrides = ["data.shards=s", "optim.lr=3e-4", "optim.betas=[0.5, 0.75]", "extra.k=3", "note=3e-4",
                 "sampler.kind=euler"]
    cfg = load_config(Run, overrides=overrides)
    assert cfg.note == "3e-4"  # a str field keeps the string; it must not come back as a float
    out = tmp_path / "run" / "deep" / "config.yaml"
    dump_config(cfg, out)
    assert load_config(Run, out) == cfg
    dumped = yaml.safe_load(out.read_text())
    assert list(dumped) == ["data", "optim", "tags", "extra", "seed", "ema", "note", "anything", "sampler"]
    assert dumped["optim"]["betas"] == [0.5, 0.75]


def test_to_dict_is_plain():
    cfg = load_config(Run, overrides=["data.shards=s"])
    assert to_dict(cfg)["optim"] == {"lr": 1e-3, "betas": [0.9, 0.999], "schedule": "cosine", "warmup": None}
    with pytest.raises(TypeError):
        to_dict({"a": 1})


def test_config_hash_is_stable_and_sensitive():
    a = load_config(Run, overrides=["data.shards=s"])
    b = load_config(Run, overrides=["data.shards=s"])
    h = config_hash(a)
    assert len(h) == 64 and h == config_hash(b)
    assert config_hash(load_config(Run, overrides=["data.shards=s", "optim.lr=2e-3"])) != h
    assert config_hash(load_config(Run, overrides=["data.shards=s", "tags=[base, x]"])) != h
