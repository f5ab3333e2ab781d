"""The Warlock SSH fallback worker: answers ``warlock.ssh.<host>.exec`` over SSH when no agent serves a host.

Modules: `settings` (``WARLOCK_SSH_*``), `errors` (the exception tree and asyncssh translation),
`execution` (sans-I/O: command wrapping, output caps, exit mapping), `pool` (pooled connections with
pinned host keys), `runner` (one command over a pooled channel), `probe` (host key + auth check of a new
host), `worker` (NATS subscriptions, micro service, shutdown), `cli` (the ``warlock-fallback-ssh``
entrypoint).
"""

from shared.version import __version__

__all__ = ["__version__"]
