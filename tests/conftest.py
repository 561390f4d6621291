"""One local Ray for the whole test session, sized so every test's actors fit on this small machine."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=12, include_dashboard=False, log_to_driver=False,
                 _system_config={"metrics_report_interval_ms": 60000})
    yield ray
    ray.shutdown()
