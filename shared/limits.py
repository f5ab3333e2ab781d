"""Time bounds that the agent and the gateway must agree on, written once.

After a command's timeout the agent SIGKILLs its process group, then waits up to `AGENT_REAP_S` for the
output pipes to close (a child that escaped the group with ``setsid`` may keep them open; the agent then
stops reading them), then records and sends the result. `AGENT_AFTER_TIMEOUT_S` bounds that whole tail:
the reap wait plus slack for killing, reaping the shell, writing the ledger and sending the frame on a
loaded host. The agent counts a command's timeout from when it received the command, and a command that
waited for a free slot runs only for what is left of it, so the agent answers at most
``timeout + AGENT_AFTER_TIMEOUT_S`` after it received the command.

A gateway waits ``timeout + exec_grace`` before it answers ``timeout`` ("the command may have run"), so
its grace must cover the agent's tail with a margin for the network and its own scheduling: at least
`MIN_EXEC_GRACE_S`. The API waits ``timeout + its own exec_grace`` for the gateway, which must be longer
again (10 s against the gateway's 5 s by default).
"""

from __future__ import annotations

from typing import Final

AGENT_REAP_S: Final = 2.0
AGENT_REPORT_SLACK_S: Final = 1.0
AGENT_AFTER_TIMEOUT_S: Final = AGENT_REAP_S + AGENT_REPORT_SLACK_S
EXEC_GRACE_MARGIN_S: Final = 1.0
MIN_EXEC_GRACE_S: Final = AGENT_AFTER_TIMEOUT_S + EXEC_GRACE_MARGIN_S
DEFAULT_EXEC_GRACE_S: Final = 5.0
