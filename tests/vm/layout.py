"""The machines of the VM suite: names, roles and addresses on the private network.

Block servers bs1..bs4 and clients client1, client2, each with one address on 10.17.0.0/24
(the multicast-socket network between the VMs; it reaches nothing else). Pure data.
"""
from dataclasses import dataclass

NETWORK_PREFIX = 24
SERVER_PORT = 7001


@dataclass(frozen=True)
class Machine:
    name: str
    role: str          # "server" or "client"
    index: int         # 1-based, unique across all machines (MAC and ssh port offsets)
    address: str

    @property
    def url(self):
        return f"http://{self.address}:{SERVER_PORT}"


MACHINES = (
    [Machine(f"bs{i}", "server", i, f"10.17.0.{10 + i}") for i in range(1, 5)]
    + [Machine(f"client{i}", "client", 4 + i, f"10.17.0.{20 + i}") for i in range(1, 3)]
)


def machine(name):
    return next(m for m in MACHINES if m.name == name)
