"""The CPU allocator keeps freed activations' memory: the next batch's forward pass reuses their pages
instead of page-faulting fresh, zeroed ones in from the kernel."""
import subprocess
import sys

import pytest

# Minor page faults over four forward passes of a small convolution net at batch 64 (33.5 MB
# activations, over glibc's largest mmap threshold), after three warm-up passes.
_PROGRAM = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from pipeline.engine.host_memory import keep_freed_memory
    assert keep_freed_memory()
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
images = torch.rand(64, 3, 64, 64)
with torch.no_grad():
    for _ in range(3):
        net(images)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        net(images)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_forward_passes_reuse_freed_memory_instead_of_page_faulting():
    default, kept = _faults("default"), _faults("keep")
    assert default > 4 * 8192 * 3  # each pass faults in its activations again (8192 pages each)
    assert kept < default / 4, (kept, default)  # measured: 16384 against 196632
