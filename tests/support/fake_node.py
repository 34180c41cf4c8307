"""A fake node: a raw NodeLink client that speaks the protocol and says what a test tells it
to (tests/integration/test_node_trust.py, test_tunnel_batches.py). Every wait is bounded."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from meshserve.client._admin import AdminClient
from meshserve.devtools.local import wait_until
from meshserve.protos import mesh_pb2, mesh_pb2_grpc

__all__ = ["FakeNode", "copies_of", "load_of"]


def load_of(model: str) -> Callable[[mesh_pb2.ControlMessage], bool]:
    """Matches the control plane's Load of ``model``."""
    return lambda m: m.HasField("load") and m.load.model == model


def copies_of(admin: AdminClient, node_id: str) -> dict[str, mesh_pb2.CopyStatus]:
    """The copies the control plane lists for ``node_id``, by model."""
    for node in admin.list_nodes():
        if node.node_id == node_id:
            return {c.model: c for c in node.copies}
    return {}


class FakeNode:
    """A NodeLink client that says what it is told to (see the module doc)."""

    def __init__(self, address: str, hello: mesh_pb2.Hello) -> None:
        self.node_id = hello.node_id
        self._outbox: queue.Queue[mesh_pb2.NodeMessage | None] = queue.Queue()
        self.inbox: queue.Queue[mesh_pb2.ControlMessage] = queue.Queue()
        self.received: list[mesh_pb2.ControlMessage] = []
        self._channel = grpc.insecure_channel(address)
        self._outbox.put(mesh_pb2.NodeMessage(hello=hello))
        self._call = mesh_pb2_grpc.NodeLinkStub(self._channel).Connect(self._messages())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _messages(self) -> Iterator[mesh_pb2.NodeMessage]:
        while (message := self._outbox.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for message in self._call:
                self.inbox.put(message)
        except grpc.RpcError:
            pass

    def send(self, **body: object) -> None:
        self._outbox.put(mesh_pb2.NodeMessage(**body))  # type: ignore[arg-type]

    def status(self, model: str, state: int, sha256: str, variant: str = "default") -> None:
        self.send(
            copy_status=mesh_pb2.CopyStatus(
                model=model, variant=variant, state=state, sha256=sha256
            )
        )

    def listed(self, admin: AdminClient) -> None:
        """Wait (20 s at most) until the control plane lists this node."""
        node_id = self.node_id
        wait_until(
            lambda: any(n.node_id == node_id for n in admin.list_nodes()),
            20,
            what=f"{node_id} listed",
        )

    def report_ready(self, admin: AdminClient, model: str, sha256: str) -> None:
        """Say ``model``'s copy is READY with ``sha256`` and wait (20 s at most) until the
        control plane lists it so."""
        self.status(model, mesh_pb2.READY, sha256)
        node_id = self.node_id

        def listed() -> bool:
            copy = copies_of(admin, node_id).get(model, mesh_pb2.CopyStatus())
            return copy.state == mesh_pb2.READY

        wait_until(listed, 20, what=f"{model} READY on {node_id}")

    def wait_for(
        self,
        match: Callable[[mesh_pb2.ControlMessage], bool],
        timeout: float = 30.0,
        since: int = 0,
    ) -> mesh_pb2.ControlMessage:
        """The first message received (now or within ``timeout``; from the ``since``-th on)
        that ``match``es."""
        for message in self.received[since:]:
            if match(message):
                return message
        found: list[mesh_pb2.ControlMessage] = []

        def arrived() -> bool:
            while not found:
                try:
                    message = self.inbox.get_nowait()
                except queue.Empty:
                    return False
                self.received.append(message)
                if match(message):
                    found.append(message)
            return True

        wait_until(arrived, timeout, what="a control message")
        return found[0]

    def drain(self) -> list[mesh_pb2.ControlMessage]:
        """Every message received so far."""
        while True:
            try:
                self.received.append(self.inbox.get_nowait())
            except queue.Empty:
                return list(self.received)

    def close(self) -> None:
        self._outbox.put(None)
        self._call.cancel()
        self._channel.close()
        self._reader.join(5)
