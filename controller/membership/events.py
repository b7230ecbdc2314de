"""What the peer tracker reports when membership changes: typed, each with a sentence for operators."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PeerFound:
    """The first heartbeat from a peer that was silent (or never heard): gratuitous ARP goes out again."""

    node: str
    network: str
    at: float

    @property
    def message(self) -> str:
        return f"peer {self.node} found, heartbeats arrive on {self.network}"


@dataclass(frozen=True)
class PeerLost:
    """No heartbeat from the peer on any network for a whole timeout."""

    node: str
    at: float
    last_heard: float

    @property
    def message(self) -> str:
        return f"peer {self.node} lost, no heartbeat on any network for {self.at - self.last_heard:g}s"


@dataclass(frozen=True)
class NetworkLost:
    """One network fell silent for a whole timeout while another still carries the peer's heartbeats."""

    node: str
    network: str
    at: float
    continuing: tuple[str, ...]

    @property
    def message(self) -> str:
        return f"network {self.network} lost, heartbeats continue on {', '.join(self.continuing)}"


@dataclass(frozen=True)
class NetworkRestored:
    """Heartbeats arrive again on a network of a peer that stayed up on another."""

    node: str
    network: str
    at: float

    @property
    def message(self) -> str:
        return f"network {self.network} restored, heartbeats from {self.node} arrive on it again"


@dataclass(frozen=True)
class PeerRestarted:
    """A heartbeat with a new boot id: the peer's daemon started again, its sequence begins anew."""

    node: str
    at: float
    boot: bytes

    @property
    def message(self) -> str:
        return f"peer {self.node} restarted, its daemon has a new boot id {self.boot.hex()}"


Event = PeerFound | PeerLost | NetworkLost | NetworkRestored | PeerRestarted
