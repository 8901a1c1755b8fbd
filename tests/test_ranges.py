"""Every number a stage config holds declares its range, and a value outside it is refused before
any work, naming the key (issue 15: 88 bad values, 17 of which ran silently or ended in tracebacks)."""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest

from pipeline import cli
from pipeline.config import ConfigError, load_config
from pipeline.launch.dag import PipelineFile
from pipeline.ranges import Range, range_of
from pipeline.registry import STAGES, load_stage
from tests.test_layering import placeholders

SCHEMAS = {name: load_stage(name).Config for name in STAGES} | {"pipeline": PipelineFile}


def _numbers(cls: type, prefix: str = "") -> list[tuple[str, Any, int]]:
    """(dotted key, the field's type with its Annotated extras, the length of the list it is an item of, or 0) of
    every number in a config schema, nested sections and list items included."""
    found = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, key, item = get_type_hints(cls, include_extras=True)[f.name], f"{prefix}{f.name}", 0
        if get_origin(tp) in (Union, types.UnionType):  # Optional[X]
            tp = next(arm for arm in get_args(tp) if arm is not type(None))
        if get_origin(tp) in (list, tuple):  # a fixed-length tuple gets the value in every place
            fixed = get_origin(tp) is tuple and Ellipsis not in get_args(tp)
            tp, item = get_args(tp)[0], len(get_args(tp)) if fixed else 1
        if dataclasses.is_dataclass(tp):
            found += _numbers(tp, f"{key}.")
        elif (get_args(tp)[0] if range_of(tp) else tp) in (int, float):
            found.append((key, tp, item))
    return found


def _outside(allowed: Range, integer: bool) -> list[float]:
    step = 1 if integer else 1e-3
    values = []
    if allowed.low is not None:
        values.append(allowed.low if allowed.low_open else allowed.low - step)
    if allowed.high is not None:
        values.append(allowed.high if allowed.high_open else allowed.high + step)
    return [int(v) if integer else v for v in values]


CASES = [(stage, key, tp, item) for stage, schema in SCHEMAS.items() for key, tp, item in _numbers(schema)]


@pytest.mark.parametrize("stage, key, tp, item", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_every_number_declares_its_range_and_a_value_outside_it_is_refused_naming_the_key(stage, key, tp, item):
    allowed = range_of(tp)
    assert allowed is not None, f"{stage}: {key} declares no Range (pipeline/ranges.py; Range() if any number makes sense)"
    integer = get_args(tp)[0] is int
    bad = _outside(allowed, integer) + ([] if integer else [math.inf, math.nan])
    for value in bad:
        text = {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan" if value != value else repr(value))
        override = f"{key}=[{', '.join([text] * item)}]" if item else f"{key}={text}"
        with pytest.raises(ConfigError) as error:
            load_config(SCHEMAS[stage], None, [override], base=placeholders(SCHEMAS[stage]) | ({"stages": {}} if stage == "pipeline" else {}))
        assert f"key '{key}{'[0]' if item else ''}'" in str(error.value) and "command line" in str(error.value)


# Values the issue found to run silently or end in a traceback; each must now exit 2 naming the key.
BAD = [("vae", "optim.min_lr_ratio=-5"), ("vae", "model.latent_dim=0"), ("beta_vae", "model.beta=-1"),
       ("vae", "launch.time=banana"), ("vae", "launch.mem=-5G"), ("vae", "trainer.max_nonfinite_skips=0"),
       ("vae", "optim.lr=.inf"), ("cvae", "model.channels=0"), ("cvae", "model.channel_mult=[1,0,4]"),
       ("vae", "engine.cpu_threads=-1"), ("shards", "count=0")]


@pytest.mark.parametrize("stage, override", BAD)
def test_a_bad_value_exits_2_naming_the_key_and_leaves_nothing_behind(stage, override, tmp_path, capsys):
    out = tmp_path / "out"
    where = [f"out_dir={out}"] if stage == "shards" else [f"trainer.out_dir={out}", f"data.shards={tmp_path}/x.tar"]
    assert cli.main(["stage", stage, *where, override]) == 2
    key = override.split("=")[0]
    assert f"key '{key}" in capsys.readouterr().err
    assert not out.exists()  # no config.yaml, no empty 00000.tar


def test_an_out_dir_that_is_a_file_is_a_config_error(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert cli.main(["stage", "vae", f"trainer.out_dir={tmp_path / 'file'}", f"data.shards={tmp_path}/x.tar"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"
