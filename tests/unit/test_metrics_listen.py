"""``--metrics-listen``: ``:PORT`` (or a bare port) binds loopback only; an explicit host is
taken as given."""

from __future__ import annotations

import pytest

from meshserve.common.process import metrics_address


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        (":9100", ("127.0.0.1", 9100)),
        ("9100", ("127.0.0.1", 9100)),
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("[::]:0", ("::", 0)),
        ("metrics.local:9100", ("metrics.local", 9100)),
    ],
)
def test_the_address_a_listen_value_names(listen: str, expected: tuple[str, int]) -> None:
    assert metrics_address(listen) == expected


@pytest.mark.parametrize("listen", [":", "host:", ":http", ":70000", "host:-1"])
def test_a_bad_listen_value_is_refused_with_its_text(listen: str) -> None:
    with pytest.raises(ValueError, match="--metrics-listen"):
        metrics_address(listen)
