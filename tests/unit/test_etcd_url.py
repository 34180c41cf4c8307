"""The etcd link's options: the endpoint list parser and the checks on credentials (pure)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshserve.common.security import SecurityConfigError
from meshserve.controlplane.etcd import Endpoint, EtcdAuth, parse_endpoints, parse_url
from meshserve.controlplane.etcd.link import check_link


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:2379", [("http", "127.0.0.1", 2379)]),
        ("127.0.0.1:4001", [("http", "127.0.0.1", 4001)]),
        ("etcd", [("http", "etcd", 2379)]),
        ("https://[::1]:2379/", [("https", "::1", 2379)]),
        (
            "https://a:2379, https://b:2380 ,https://10.0.0.3",
            [("https", "a", 2379), ("https", "b", 2380), ("https", "10.0.0.3", 2379)],
        ),
    ],
)
def test_endpoint_lists_parse_in_order(text: str, expected: list[tuple[str, str, int]]) -> None:
    assert [(e.scheme, e.host, e.port) for e in parse_endpoints(text)] == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "no etcd endpoint"),
        ("https://a:1,", "empty entry"),
        ("http://a:1,https://b:1", "mix"),
        ("https://a:1,https://a:1", "listed twice"),
        ("unix:///x", "scheme"),
        ("https://h:1/path", "scheme://host:port"),
        ("https://:1", "no host"),
        ("https://h:99999", "bad port"),
        ("h:x", "bad port"),
        (",".join(f"h{i}:1" for i in range(17)), "at most 16"),
    ],
)
def test_bad_endpoint_lists_are_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_endpoints(text)


def test_credentials_in_a_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(ValueError) as caught:
        parse_endpoints("https://root:hunter2@etcd:2379")
    assert "hunter2" not in str(caught.value)
    assert "--etcd-password-file" in str(caught.value)


def test_parse_url_stays_one_plain_url() -> None:
    assert parse_url("http://[::1]:2379") == ("::1", 2379)
    with pytest.raises(ValueError):
        parse_url("https://h:1")
    with pytest.raises(ValueError):
        parse_url("http://a:1,http://b:1")


def test_endpoint_target_and_loopback() -> None:
    assert Endpoint("https", "::1", 2379).target == "[::1]:2379"
    assert str(Endpoint("https", "::1", 2379)) == "https://[::1]:2379"
    assert Endpoint("http", "localhost", 1).loopback
    assert Endpoint("http", "127.0.0.2", 1).loopback
    assert not Endpoint("http", "10.0.0.1", 1).loopback
    assert not Endpoint("http", "etcd.example", 1).loopback


def _secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_auth_from_files_reads_the_password_and_checks_modes(tmp_path: Path) -> None:
    password = _secret(tmp_path / "pw", "# etcd\ns3cret\n")
    auth = EtcdAuth.from_files(user="meshserve", password_file=password)
    assert auth is not None and auth.user == "meshserve" and auth.password == "s3cret"
    assert "s3cret" not in repr(auth)
    assert EtcdAuth.from_files() is None
    os.chmod(password, 0o644)
    with pytest.raises(SecurityConfigError, match="chmod 600"):
        EtcdAuth.from_files(user="meshserve", password_file=password)


def test_a_user_and_a_password_file_go_together(tmp_path: Path) -> None:
    password = _secret(tmp_path / "pw", "s3cret\n")
    with pytest.raises(SecurityConfigError, match="needs --etcd-user"):
        EtcdAuth.from_files(password_file=password)
    with pytest.raises(SecurityConfigError, match="needs --etcd-password-file"):
        EtcdAuth.from_files(user="meshserve")


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    cert = _secret(tmp_path / "c.crt", "not read before the mode check", 0o644)
    key = _secret(tmp_path / "c.key", "x", 0o640)
    with pytest.raises(SecurityConfigError, match="etcd TLS key file"):
        EtcdAuth.from_files(cert=cert, key=key)
    with pytest.raises(SecurityConfigError, match="go together"):
        EtcdAuth.from_files(cert=cert)


def test_link_checks_refuse_unused_tls_and_clear_text_passwords(tmp_path: Path) -> None:
    ca = _secret(tmp_path / "ca.crt", "-----", 0o644)
    tls_auth = EtcdAuth.from_files(ca=ca)
    with pytest.raises(ValueError, match="use https://"):
        check_link(parse_endpoints("http://127.0.0.1:2379"), tls_auth)
    check_link(parse_endpoints("https://etcd:2379"), tls_auth)
    password = EtcdAuth(user="meshserve", password="s3cret")
    check_link(parse_endpoints("http://127.0.0.1:2379,http://localhost:2380"), password)
    with pytest.raises(ValueError, match=r"in the clear to http://10\.0\.0\.5:2379"):
        check_link(parse_endpoints("http://127.0.0.1:2379,http://10.0.0.5:2379"), password)
    check_link(parse_endpoints("https://10.0.0.5:2379"), password)


def test_meshctl_up_passes_an_etcd_s_files_on_checked(tmp_path: Path) -> None:
    from meshserve.devtools.etcd import client_flags

    password = _secret(tmp_path / "pw", "s3cret\n")
    flags = client_flags("https://127.0.0.1:2379", user="meshserve", password_file=str(password))
    assert flags == ["--etcd-user", "meshserve", "--etcd-password-file", str(password)]
    assert client_flags("http://127.0.0.1:2379") == []
    os.chmod(password, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        client_flags("https://127.0.0.1:2379", user="meshserve", password_file=str(password))
