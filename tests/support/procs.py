"""Real processes for tests: the harness is `services.dev.procs` (shared with the launcher and the
benchmark); this module re-exports it for the tests that import it from here. New code imports
`services.dev.procs`."""

from services.dev.procs import BIN, Proc, WaitFailed, free_port, rss_kib

__all__ = ["BIN", "Proc", "WaitFailed", "free_port", "rss_kib"]
