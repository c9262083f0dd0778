"""Soak, short (issue 9, part 3): 10^5 numbered messages each way, two processes, at once.

``tools/soak.py`` is the long run (10^7 by default); this is the same code with a count CI
can afford. Nothing may be lost, duplicated or reordered, no slot dropped, no fd left open,
and RSS may not grow with the count (the long run's figures are in the issue's closing note).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ivshmem_bus.core import protocol as p

COUNT = 100_000
RSS_GROWTH_LIMIT_KIB = 16 * 1024  # the first run faults in code and buffers; not per message


def load_soak():
    path = Path(__file__).resolve().parent.parent / "tools" / "soak.py"
    spec = importlib.util.spec_from_file_location("ivshmem_bus_soak_tool", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = load_soak()


@pytest.mark.slow
@pytest.mark.parametrize("profile", p.PROFILES)
def test_soak_both_ways_nothing_lost_duplicated_or_reordered(profile, record_property) -> None:
    result = soak.run(COUNT, profile=profile, seed=7, stall=20.0)
    driver, device = result["sides"]
    assert device is not None, "the device process sent no report"
    for side in (driver, device):
        assert side["sent"] == COUNT, side
        assert side["received"] == COUNT, side
        assert (side["lost"], side["duplicated"], side["reordered"]) == (0, 0, 0), side
        assert side["unexpected"] == 0 and not side["send_error"] and not side["stalled"], side
        stats = side["stats"]
        assert stats["malformed"] == stats["unknown"] == stats["stray_responses"] == 0, stats
        assert stats["received"] == COUNT and stats["sent"] == COUNT, stats
        assert side["fds_after"] == side["fds_before"], side
        assert side["rss_kib_after"] - side["rss_kib_before"] < RSS_GROWTH_LIMIT_KIB, side
    assert result["child_exitcode"] == 0
    assert result["ok"]
    record_property("messages_per_second", result["messages_per_second"])
    print(
        f"\nsoak {profile}: {COUNT:,} each way in {result['seconds']} s "
        f"({result['messages_per_second']:,} msg/s)"
    )


def test_soak_tool_rejects_a_bad_count() -> None:
    with pytest.raises(ValueError, match="count must be"):
        soak.run(0)


def test_soak_tool_main_reports_and_exits_zero(capsys) -> None:
    assert soak.main(["--count", "2000", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "lost 0, duplicated 0, reordered 0" in out and out.rstrip().endswith("OK")
