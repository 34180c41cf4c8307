"""The link to etcd: which endpoints, over what transport, as which user -- the one seam.

Contract:

* :func:`parse_endpoints` reads ``--etcd``: one URL or a comma-separated list
  (``https://a:2379,https://b:2379``). Each is ``http://`` or ``https://`` (no scheme: ``http``),
  a host (DNS name, IPv4, ``[IPv6]``) and a port (default 2379); all share one scheme; no path,
  query, credentials or duplicates.
* :class:`EtcdAuth` is how this process proves itself and checks etcd: ``tls`` (the CA that
  etcd's certificate must chain to; a client certificate and key, which etcd's
  ``--client-cert-auth`` maps to the user named by its CN) and/or ``user`` + ``password`` (etcd's
  Authenticate; the token it returns rides on every call). Built from files only
  (:meth:`EtcdAuth.from_files`): a password never appears on a command line, in the environment
  or in a log; key and password files must not be readable by group or others.
* :func:`open_client` returns an ``aetcd.Client`` whose channel is :class:`FailoverChannel`: one
  gRPC channel to one endpoint at a time, TLS for ``https``. A call made while that channel is
  in TRANSIENT_FAILURE moves to the next endpoint first (round robin), so a member that went
  down is left for the next one without restarting the process. A call refused for an expired
  or unknown token (etcd's simple tokens live in one member's memory: they die with a restart
  and do not hold on another member) re-authenticates once and is retried once.
* A password is only ever sent over TLS or to a loopback address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc
from grpc import aio

from meshserve.common.security import (
    SecurityConfigError,
    TLSFiles,
    channel_credentials,
    read_secret,
)

__all__ = [
    "DEFAULT_PORT",
    "Endpoint",
    "EtcdAuth",
    "FailoverChannel",
    "add_etcd_options",
    "auth_from_args",
    "check_link",
    "open_client",
    "parse_endpoints",
    "reauthenticate",
    "stale_token",
    "stale_token_text",
]

#: etcd's standard client port, used when a URL names none.
DEFAULT_PORT = 2379

#: The most endpoints one ``--etcd`` may list (an etcd cluster has a handful of members).
MAX_ENDPOINTS = 16

#: What etcd says of a token it does not (or no longer) know, or one older than the auth store.
_STALE_TOKEN_MARKS = ("auth token", "revision of auth store is old")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One etcd client URL, parsed."""

    scheme: Literal["http", "https"]
    host: str
    port: int

    @property
    def target(self) -> str:
        """``host:port`` as gRPC dials it (``[v6]:port`` for an IPv6 literal)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.scheme}://{self.target}"


def parse_endpoint(url: str, *, schemes: Sequence[str] = ("http", "https")) -> Endpoint:
    """Parse one etcd URL (see the module contract). :raises ValueError: naming the URL."""
    text = url.strip()
    if not text:
        raise ValueError("empty etcd URL")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in schemes:
        allowed = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"unsupported etcd URL scheme {parts.scheme!r} in {url!r}: use {allowed}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"credentials in an etcd URL are not accepted ({url.split('@')[-1]!r}): "
            "use --etcd-user and --etcd-password-file"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"etcd URL must be scheme://host:port, got {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"etcd URL has no host: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in etcd URL {url!r}") from exc
    if port is None:
        port = DEFAULT_PORT
    if port == 0:
        raise ValueError(f"bad port in etcd URL {url!r}")
    scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
    return Endpoint(scheme, host, port)


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """Parse ``--etcd``: one URL or a comma-separated list, one scheme for all, no duplicates.

    :raises ValueError: naming what is wrong (never a secret: credentials in URLs are refused
        without being echoed).
    """
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ValueError("no etcd endpoint given")
    if any(not item for item in items):
        raise ValueError(f"empty entry in etcd endpoint list {text!r}")
    if len(items) > MAX_ENDPOINTS:
        raise ValueError(f"at most {MAX_ENDPOINTS} etcd endpoints, got {len(items)}")
    endpoints = tuple(parse_endpoint(item) for item in items)
    if len({e.scheme for e in endpoints}) > 1:
        raise ValueError(f"etcd endpoints mix http:// and https://: {text!r}")
    seen: set[tuple[str, int]] = set()
    for e in endpoints:
        if (e.host, e.port) in seen:
            raise ValueError(f"etcd endpoint {e} is listed twice")
        seen.add((e.host, e.port))
    return endpoints


def _check_private(path: Path, what: str) -> None:
    """A key or password file must be readable by its owner only (mode 0600 or stricter)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityConfigError(
            f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(mode):o}): "
            "chmod 600 it"
        )


@dataclass(frozen=True)
class EtcdAuth:
    """How this process authenticates to etcd and verifies it (see the module contract)."""

    tls: TLSFiles | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise SecurityConfigError("an etcd user and its password go together: give both")
        if self.user is not None and not self.user:
            raise SecurityConfigError("the etcd user name is empty")

    @classmethod
    def from_files(
        cls,
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        user: str | None = None,
        password_file: str | Path | None = None,
    ) -> EtcdAuth | None:
        """From options ("" and None mean absent); None when nothing is given. Files are read
        (and checked: the key and password files 0600) now, so a bad one fails at start."""
        tls = TLSFiles.from_options(ca, cert, key)
        if tls is not None:
            if tls.key is not None:
                _check_private(tls.key, "etcd TLS key file")
            tls.ca_bytes()
            tls.pair()
        password = None
        if password_file:
            path = Path(password_file)
            _check_private(path, "etcd password file")
            password = read_secret(path, "etcd password file")
            if not user:
                raise SecurityConfigError("--etcd-password-file needs --etcd-user")
        elif user:
            raise SecurityConfigError("--etcd-user needs --etcd-password-file")
        if tls is None and password is None:
            return None
        return cls(tls=tls, user=user or None, password=password)


def check_link(endpoints: Sequence[Endpoint], auth: EtcdAuth | None) -> None:
    """Refuse combinations that would not protect what they claim to.

    :raises ValueError: TLS files with ``http://`` endpoints (they would be silently unused),
        or a password for a plain ``http://`` endpoint that is not on loopback.
    """
    if auth is None or not endpoints:
        return
    plain = endpoints[0].scheme == "http"
    if plain and auth.tls is not None:
        raise ValueError("etcd TLS files given but the etcd endpoints are http://: use https://")
    if plain and auth.password is not None:
        remote = [str(e) for e in endpoints if not e.loopback]
        if remote:
            raise ValueError(
                f"refusing to send the etcd password in the clear to {', '.join(remote)}: "
                "use https://"
            )


# -- command-line options (every process that talks to etcd takes the same) -----------------


def add_etcd_options(parser: Any, *, default: str = "http://127.0.0.1:2379") -> None:
    """Add ``--etcd`` and the etcd security options to an ``argparse`` parser."""
    g = parser.add_argument_group("etcd link (docs/security.md)")
    g.add_argument(
        "--etcd",
        default=default,
        help="etcd client URL, or several comma-separated (https://a:2379,https://b:2379); "
        "https:// uses TLS",
    )
    g.add_argument("--etcd-ca", default="", help="PEM CA that etcd's certificate must chain to")
    g.add_argument(
        "--etcd-cert",
        default="",
        help="PEM client certificate for etcd (with --client-cert-auth its CN is the user)",
    )
    g.add_argument("--etcd-key", default="", help="PEM private key of --etcd-cert (mode 0600)")
    g.add_argument("--etcd-user", default="", help="etcd user (with --etcd-password-file)")
    g.add_argument(
        "--etcd-password-file",
        default="",
        help="file holding the etcd user's password (mode 0600; never on the command line)",
    )


def auth_from_args(ns: Any) -> tuple[str, EtcdAuth | None]:
    """``(endpoints text, auth)`` from options added by :func:`add_etcd_options`, checked.

    :raises ValueError: a bad endpoint list or combination (SecurityConfigError: a bad file).
    """
    auth = EtcdAuth.from_files(
        ca=ns.etcd_ca,
        cert=ns.etcd_cert,
        key=ns.etcd_key,
        user=ns.etcd_user or None,
        password_file=ns.etcd_password_file,
    )
    check_link(parse_endpoints(ns.etcd), auth)
    return ns.etcd, auth


# -- the channel -----------------------------------------------------------------------------


def _stale_token(exc: BaseException) -> bool:
    if not isinstance(exc, aio.AioRpcError):
        return False
    code = exc.code()
    if code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
        return False
    details = exc.details() or ""
    return any(mark in details for mark in _STALE_TOKEN_MARKS)


MetadataRefresh = Callable[[Any], Awaitable[Any]]


class FailoverChannel:
    """Quacks like ``grpc.aio.Channel`` for generated stubs: each call goes to the channel of
    the current endpoint (see the module contract). Unary calls return coroutines."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        credentials: grpc.ChannelCredentials | None,
        options: Mapping[str, Any],
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self._endpoints = tuple(endpoints)
        self._credentials = credentials
        self._options = list(options.items())
        self._index = 0
        self._channel = self._open(0)
        self._closing: set[asyncio.Task[None]] = set()
        #: set by the client: re-authenticate, given the metadata a refused call carried
        self.refresh: MetadataRefresh | None = None

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint calls go to now."""
        return self._endpoints[self._index]

    def _open(self, index: int) -> aio.Channel:
        target = self._endpoints[index].target
        if self._credentials is None:
            return aio.insecure_channel(target, options=self._options)
        return aio.secure_channel(target, self._credentials, options=self._options)

    def rotate(self) -> None:
        """Move to the next endpoint (the old channel is closed in the background)."""
        if len(self._endpoints) < 2:
            return
        old = self._channel
        self._index = (self._index + 1) % len(self._endpoints)
        self._channel = self._open(self._index)
        task = asyncio.ensure_future(old.close(grace=None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def current(self) -> aio.Channel:
        """The channel for the next call: the next endpoint's if this one is failing."""
        if (
            len(self._endpoints) > 1
            and self._channel.get_state(try_to_connect=False)
            == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        ):
            self.rotate()
        return self._channel

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> _UnaryUnary:
        return _UnaryUnary(self, method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _Streaming:
        return _Streaming(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _Streaming:
        return _Streaming(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _Streaming:
        return _Streaming(self, "stream_stream", method, args, kwargs)


class _Streaming:
    """A streaming multicallable bound to whichever channel is current at call time."""

    def __init__(
        self, owner: FailoverChannel, kind: str, method: str, args: tuple[Any, ...], kw: Any
    ) -> None:
        self._owner, self._kind, self._method, self._args, self._kw = owner, kind, method, args, kw

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        return getattr(channel, self._kind)(self._method, *self._args, **self._kw)(*args, **kwargs)


class _UnaryUnary:
    """A unary multicallable on the current channel; a stale token is renewed once."""

    def __init__(self, owner: FailoverChannel, method: str, args: tuple[Any, ...], kw: Any) -> None:
        self._owner, self._method, self._args, self._kw = owner, method, args, kw

    def _call(self, request: Any, metadata: Any, kwargs: Any) -> Any:
        channel = self._owner.current()
        stub = channel.unary_unary(self._method, *self._args, **self._kw)
        return stub(request, metadata=metadata, **kwargs)

    async def __call__(self, request: Any, *, metadata: Any = None, **kwargs: Any) -> Any:
        try:
            return await self._call(request, metadata, kwargs)
        except aio.AioRpcError as exc:
            refresh = self._owner.refresh
            if refresh is None or not metadata or not _stale_token(exc):
                raise
            metadata = await refresh(metadata)
        return await self._call(request, metadata, kwargs)


# -- the client ------------------------------------------------------------------------------


class _LinkedClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """``aetcd.Client`` over a :class:`FailoverChannel`, re-authenticating on stale tokens."""

    # set by aetcd's ``__init__`` / ``_init_channel_attrs`` and by :meth:`connect`
    channel: Any
    metadata: Any
    auth_stub: Any
    _is_connecting: bool

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        auth: EtcdAuth | None,
        *,
        timeout: float,
        options: Mapping[str, Any],
    ) -> None:
        first = endpoints[0]
        super().__init__(
            first.host,
            first.port,
            username=None if auth is None else auth.user,
            password=None if auth is None else auth.password,
            timeout=timeout,
            options=dict(options),
        )
        self._endpoints = tuple(endpoints)
        self._tls = None if auth is None else auth.tls
        self._auth_lock: asyncio.Lock | None = None

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if self._endpoints[0].scheme == "http":
            return None
        if self._tls is None:  # https with the system's roots, no client certificate
            return grpc.ssl_channel_credentials()
        return channel_credentials(self._tls)

    async def _authenticate(self) -> None:
        request = aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password)
        reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
        self.metadata = (("token", reply.token),)

    async def reauthenticate(self, stale: Any) -> Any:
        """New token metadata unless another call already replaced ``stale``."""
        if self._auth_lock is None:
            self._auth_lock = asyncio.Lock()
        async with self._auth_lock:
            if self.metadata == stale and self._username is not None:
                await self._authenticate()
        return self.metadata

    async def connect(self) -> None:
        """Open the channel; authenticate (trying each endpoint in turn) when a user is set."""
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            channel = FailoverChannel(self._endpoints, self._credentials(), self._options)
            self.channel = channel
            self.auth_stub = aetcd.rpc.AuthStub(channel)
            if self._username is not None:
                channel.refresh = self.reauthenticate
                for attempt in range(len(self._endpoints)):
                    try:
                        await self._authenticate()
                        break
                    except aio.AioRpcError as exc:
                        if (
                            exc.code() != grpc.StatusCode.UNAVAILABLE
                            or attempt == len(self._endpoints) - 1
                        ):
                            aetcd.exceptions._handle_exception(exc)
                        channel.rotate()
            self.kvstub = aetcd.rpc.KVStub(channel)
            self.clusterstub = aetcd.rpc.ClusterStub(channel)
            self.leasestub = aetcd.rpc.LeaseStub(channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(channel)
            self._watcher = aetcd.watcher.Watcher(
                aetcd.rpc.WatchStub(channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        except BaseException:
            channel_opened = self.channel
            self._init_channel_attrs()
            if channel_opened is not None:
                await channel_opened.close()
            raise
        finally:
            self._is_connecting = False


def open_client(
    endpoints: Sequence[Endpoint],
    auth: EtcdAuth | None,
    *,
    timeout: float,
    options: Mapping[str, Any],
) -> Any:
    """An unconnected client for ``endpoints`` (``await client.connect()``)."""
    check_link(endpoints, auth)
    return _LinkedClient(endpoints, auth, timeout=timeout, options=options)


async def reauthenticate(client: Any, stale: Any) -> Any:
    """Fresh token metadata for ``client`` after a call carrying ``stale`` was refused for its
    token (a no-op returning ``client.metadata`` for a client without a user)."""
    renew = getattr(client, "reauthenticate", None)
    if renew is None:
        return client.metadata
    return await renew(stale)


def stale_token(exc: BaseException) -> bool:
    """Whether ``exc`` (a gRPC error, or aetcd's mapping of one) is etcd refusing a token it no
    longer knows -- worth one re-authentication."""
    if _stale_token(exc):
        return True
    cause = exc.__cause__
    return (
        isinstance(exc, aetcd.exceptions.ClientError)
        and cause is not None
        and (_stale_token(cause))
    )


def stale_token_text(text: str) -> bool:
    """Whether a watch's cancel reason says its token was refused."""
    return any(mark in text for mark in _STALE_TOKEN_MARKS) or "permission denied" in text
