from __future__ import annotations

from millstream_agent.clock import ClockWatch


class Fake:
    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 100.0

    def step(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_pi_booting_at_1970_is_unsynced_until_ntp() -> None:
    t = Fake(wall=30.0)
    clock = ClockWatch(min_year=2024, wall=lambda: t.wall, mono=lambda: t.mono)
    assert not clock.synced()
    t.wall = 1_800_000_000.0  # NTP set the clock: a forward jump is fine
    assert clock.synced()


def test_time_going_backwards_marks_unsynced_for_settle() -> None:
    t = Fake(wall=1_800_000_000.0)
    clock = ClockWatch(settle=60, wall=lambda: t.wall, mono=lambda: t.mono)
    assert clock.synced()
    t.step(1)
    t.wall -= 3600
    assert not clock.synced()
    t.step(30)
    assert not clock.synced()
    t.step(31)
    assert clock.synced()
