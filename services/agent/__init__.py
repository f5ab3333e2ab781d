"""The Warlock agent: runs on each managed host, dials out to a gateway over WebSocket.

Modules: `config` (settings), `executor` (runs commands), `ledger` (run-at-most-once record),
`results` (trimming, output bounds and un-acked results), `commands` (the concurrency cap) and `budget`
(sans-I/O: a command's timeout across its wait for a slot), `backoff` (reconnect policy), `dispatch`
(sans-I/O frame decisions), `metrics` (psutil samples), `client` (the connection loop), `allocator`
(glibc tuning), `cli` (the ``warlock-agent`` entrypoint). The benchmark swarm of simulated agents is
`services.dev.swarm`, outside the agent package.
"""

from shared.version import __version__

__all__ = ["__version__"]
