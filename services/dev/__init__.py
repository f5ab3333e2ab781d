"""Development and benchmark tools, outside the services they start: never imported by them.

`stack` (`warlock run`: the whole stack on one machine), `cluster` (`warlock run --cluster`), `control`
(the launcher's control socket: `warlock agent stop|start|status`), `procs` (one process harness: free
ports, children that die with their parent, logs, waiting for a line; used by the launcher, the tests
and the benchmark), `token_file` (the dev token authority), `swarm` (many simulated agents for the
benchmark and the tests).
"""
