import pytest

from stages.shards import ShardsConfig, build


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory):
    """96 shapes samples at 32 px in 3 shards."""
    out = tmp_path_factory.mktemp("shapes")
    build(ShardsConfig(out_dir=str(out), count=96, resolution=32, samples_per_shard=32))
    return str(out)


def toy_overrides(shards: str, out_dir, **extra) -> list[str]:
    values = {"data.shards": shards, "data.resolution": 32, "data.batch_size": 8, "data.num_workers": 0,
              "trainer.out_dir": str(out_dir), "trainer.log_every": 1, "optim.schedule": "constant",
              "trainer.deterministic": True}
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]
