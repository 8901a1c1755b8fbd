import pytest

from pipeline.config import ConfigError, load_config
from stages import cvae, vae

REQUIRED = ["data.shards=shards", "trainer.out_dir=out"]


def test_stage_configs_check_their_knobs_before_any_work():
    with pytest.raises(ConfigError, match=r"model.image_size \(32\) must equal data.resolution \(64\)"):
        load_config(vae.Config, "configs/vae/tiny.yaml", [*REQUIRED, "data.resolution=64"])
    with pytest.raises(ConfigError, match="zero_stage needs backend 'deepspeed'"):
        load_config(vae.Config, "configs/vae/tiny.yaml", [*REQUIRED, "engine.zero_stage=2"])
    with pytest.raises(ConfigError, match="channels_last needs backend 'accelerate'"):
        load_config(vae.Config, "configs/vae/tiny.yaml", [*REQUIRED, "engine.backend=deepspeed", "engine.channels_last=true"])
    with pytest.raises(ConfigError, match="set data.tokenizer"):
        load_config(cvae.Config, "configs/cvae/tiny.yaml", [*REQUIRED, "data.tokenizer=null"])
    with pytest.raises(ConfigError, match=r"configs/vae/tiny.yaml.*missing|data.shards is required"):
        load_config(vae.Config, "configs/vae/tiny.yaml", ["trainer.out_dir=out"])
    cfg = load_config(vae.Config, "configs/vae/tiny.yaml", [*REQUIRED, "optim.lr=3e-4", "launch.nproc_per_node=2"])
    assert cfg.optim.lr == 3e-4 and cfg.launch.nproc_per_node == 2 and cfg.model.beta == 1.0
