"""What keeps the code base layered: the library never imports a stage, models are pure PyTorch,
markers and exit codes load without torch, and every shipped config loads and validates."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.launch.dag import load_pipeline
from pipeline.registry import STAGES, load_stage

ROOT = Path(__file__).resolve().parents[1]
# Required keys a stage config leaves to the pipeline that runs it.
PLACEHOLDERS = {"trainer": {"out_dir": "x"}, "data": {"shards": "x"}, "dvae": "x", "autoencoder": "x",
                "out_dir": "x", "shards": "x", "run": "x", "captions": "x", "samples": "x"}


def placeholders(schema: type) -> dict:
    """PLACEHOLDERS for the required keys a stage config `schema` has."""
    fields = set(schema.__dataclass_fields__)
    return {key: value for key, value in PLACEHOLDERS.items() if key in fields}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_a_stage():
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in _imports(path) if name.split(".")[0] == "stages")
                 for path in (ROOT / "pipeline").rglob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}


def _pure(name: str) -> bool:
    """Whether a model file may import `name`: torch (its collectives too, as SyncBatchNorm and the
    EMA codebook use them) and diffusers' networks and schedulers, the standard library but not its
    files, processes and signals, other models, the task contract and the config ranges."""
    top = name.split(".")[0]
    if top in ("torch", "diffusers"):
        return True
    if top in sys.stdlib_module_names:
        return top not in {"os", "pathlib", "shutil", "subprocess", "signal", "socket", "tempfile", "io"}
    return name.startswith(("pipeline.models", "pipeline.engine.task", "pipeline.ranges"))


def test_models_are_pure_pytorch_modules():
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in _imports(path) if not _pure(name))
                 for path in (ROOT / "pipeline" / "models").glob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_markers_and_exit_codes_load_without_torch():
    program = "import sys, pipeline.markers; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT,
                          check=True).stdout.strip() == "False"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_shipped_config_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name word lists relative to the repository
    if path.parent.name == "pipelines":
        _, jobs = load_pipeline(path)
        assert jobs
        return
    assert path.parent.name in STAGES, f"{path}: configs/STAGE/*.yaml, STAGE a registered stage"
    schema = load_stage(path.parent.name).Config
    load_config(schema, path, base=placeholders(schema))
