"""One local Ray for the whole test session, sized so every test's actors fit on this small machine."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Row-invariant kernels wherever one exists (set before Ray starts, so every actor and serve child runs them):
# tests compare replicas' and micro-batches' split products with whole ones bit for bit. The default (fastest
# kernels, bits may depend on the row count) is tested in tests/model/test_kernel_choice.py.
os.environ.setdefault("EXPERTMESH_KERNELS", "invariant")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=12, include_dashboard=False, log_to_driver=False,
                 _system_config={"metrics_report_interval_ms": 60000})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread in the test process: on a shared 2-core machine OpenMP barriers cost more than they save
    on test-sized tensors (a tiny decode step goes from ~20 ms to ~3 ms)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
