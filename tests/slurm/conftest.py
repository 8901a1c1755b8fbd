"""The local two-node SLURM cluster (slurm/local-cluster.sh) for tests that need a real scheduler."""
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "local-cluster.sh"
CANNOT_RUN_HERE = 3  # the script's exit code for "not root / no slurm and no apt-get"


@pytest.fixture(scope="session")
def slurm_cluster() -> list[str]:
    """Brings the cluster up (installing slurm with apt on a fresh machine) and returns its node names.

    Skips only when the script says it cannot run on this machine; any other failure is an error.
    The cluster is left running: other tests reuse it and a later `up` takes a fraction of a second.
    """
    try:
        result = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{SCRIPT} up did not finish in 300 s\n{error.stdout}\n{error.stderr}", pytrace=False)
    if result.returncode == CANNOT_RUN_HERE:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "local-cluster.sh exit 3"
        pytest.skip(reason)
    if result.returncode != 0:
        pytest.fail(f"{SCRIPT} up exited {result.returncode}\n--- stdout\n{result.stdout}\n"
                    f"--- stderr\n{result.stderr}", pytrace=False)
    return ["node1", "node2"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; runs only with T2I_SLOW=1")
