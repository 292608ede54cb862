"""The session's Ray (tests/conftest.py `ray_session`) as its workers see it."""

from __future__ import annotations


def test_workers_state_api_refuses_instead_of_asking_another_ray(ray_session):
    """Ray Train's PlacementGroupCleaner removes a run's placement group when the
    state API says its controller does not exist. This Ray has no dashboard, so
    its workers' state API must fail (the cleaner then asks again) rather than
    reach another Ray's dashboard on the machine, which knows none of its actors."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    def ask() -> tuple[str | None, str]:
        import os

        from ray.util.state import get_actor
        from ray.util.state.exception import RayStateApiException

        address = os.environ.get("RAY_API_SERVER_ADDRESS")
        try:
            answer = get_actor("0" * 32, timeout=5)
        except RayStateApiException as e:
            return address, type(e).__name__
        return address, f"answered {answer!r}"

    address, outcome = ray.get(ask.remote(), timeout=60)
    assert address is not None and address.startswith("http://127.0.0.1:")
    assert outcome == "ServerUnavailable"
