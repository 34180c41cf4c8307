"""Prints the chaos table (fault -> failed requests -> recovery time) after the run."""

from __future__ import annotations

import json
from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.chaos.test_chaos import ETCD_DB, RESULTS

    if ETCD_DB:
        terminalreporter.write_line(
            f"chaos: etcd after the faults: revision {ETCD_DB['revision']}, dbSize "
            f"{ETCD_DB['db_size'] / 2**20:.2f} MiB ({ETCD_DB['in_use'] / 2**20:.2f} MiB in use)"
        )

    if not RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("chaos: fault -> failed requests -> recovery")
    write(
        f"{'fault':<38} {'requests':>8} {'raw failed':>10} {'sdk failed':>10} "
        f"{'wrong':>5} {'recovery s':>10}  raw failures by status"
    )
    for row in RESULTS:
        write(
            f"{row['fault']:<38} {row['requests']:>8} {row['raw_failed']:>10} "
            f"{row['sdk_failed']:>10} {row['wrong']:>5} {row['recovery_s']:>10}  "
            f"{json.dumps(row['raw_failed_codes'])}"
        )
