"""A tiny DALL-E path, trained once per session: shapes shards -> dvae -> token shards -> prior."""
import pytest

from pipeline.config import load_config
from pipeline.runs import run_stage
from stages import dalle, dvae, pretokenize
from stages.shards import ShardsConfig, build


@pytest.fixture(scope="session")
def dalle_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("dalle-path")
    build(ShardsConfig(out_dir=str(root / "shapes"), count=90, resolution=64, samples_per_shard=30))
    small = ["data.num_workers=0", "data.batch_size=8", "trainer.max_steps=2", "trainer.log_every=1"]
    dvae_cfg = load_config(dvae.Config, "configs/dvae/tiny.yaml",
                           [f"data.shards={root / 'shapes'}", f"trainer.out_dir={root / 'dvae'}", *small])
    assert run_stage("dvae", dvae_cfg) == 0
    tokens_cfg = load_config(pretokenize.Config, "configs/pretokenize/shapes.yaml",
                             [f"shards={root / 'shapes'}", f"autoencoder={root / 'dvae'}", f"out_dir={root / 'tokens'}",
                              "num_workers=0"])
    assert pretokenize.run(tokens_cfg) == 0
    prior_cfg = load_config(dalle.Config, "configs/dalle/tiny.yaml",
                            [f"data.shards={root / 'tokens'}", f"dvae={root / 'dvae'}",
                             f"trainer.out_dir={root / 'prior'}", *small])
    assert run_stage("dalle", prior_cfg) == 0
    return root
