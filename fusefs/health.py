"""Which block servers are usable now.

A server that fails a request (unreachable, timed out, wrong id, refused signature) is
marked down and skipped; it is probed again after a back-off that doubles from
`probe_min` to `probe_max`; when a probe succeeds it is up again and `on_up` listeners run
(the cluster uses that to start repairing the copies the server missed). Errors about one
block (missing, corrupt) say nothing about the server and do not mark it down.

`_lock` guards `_states`; it is never held while calling out (listeners run after release).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class ServerState:
    up: bool = True
    failures: int = 0
    next_probe: float = 0.0
    last_error: str = ""


class Health:
    def __init__(self, member_ids, probe_min: float = 0.5, probe_max: float = 30.0):
        self.probe_min, self.probe_max = probe_min, probe_max
        self._lock = threading.Lock()
        self._states = {m: ServerState() for m in member_ids}
        self._listeners = []

    def on_up(self, callback) -> None:
        """Call `callback(member_id)` whenever a server comes back up."""
        self._listeners.append(callback)

    def track(self, member_ids) -> None:
        """Start tracking servers not known yet (a membership change), as usable."""
        with self._lock:
            for member_id in member_ids:
                self._states.setdefault(member_id, ServerState())

    def usable(self, member_id: str) -> bool:
        with self._lock:
            return self._states[member_id].up

    def failed(self, member_id: str, error: Exception) -> None:
        with self._lock:
            state = self._states[member_id]
            state.failures += 1
            state.up = False
            delay = min(self.probe_max, self.probe_min * 2 ** min(state.failures - 1, 16))
            state.next_probe = time.monotonic() + delay
            state.last_error = str(error)

    def succeeded(self, member_id: str) -> None:
        with self._lock:
            state = self._states[member_id]
            came_back = not state.up
            state.up, state.failures = True, 0
        if came_back:
            for callback in self._listeners:
                callback(member_id)

    def due_probes(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [m for m, s in self._states.items() if not s.up and s.next_probe <= now]

    def snapshot(self) -> dict[str, ServerState]:
        with self._lock:
            return {m: ServerState(**vars(s)) for m, s in self._states.items()}
