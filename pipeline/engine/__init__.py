"""The one training loop (`loop.train`) and what surrounds it: back ends, checkpoints, monitoring."""
