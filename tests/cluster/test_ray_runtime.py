"""The environment the router and worker actors start with."""

from cluster.ray_runtime import ACTOR_OMP_SPINCOUNT, actor_env


def test_actor_env_sets_a_short_openmp_spin_unless_the_caller_has_one():
    assert actor_env({}) == {"GOMP_SPINCOUNT": ACTOR_OMP_SPINCOUNT}
    assert actor_env({"GOMP_SPINCOUNT": "0", "OTHER": "x"}) == {"GOMP_SPINCOUNT": "0"}
