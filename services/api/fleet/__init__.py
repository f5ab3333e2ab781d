"""The API's fleet layer: what it does to hosts, over NATS, on top of the store; no HTTP.

runner        the hybrid runner: record a run, ask the agent, fall back to SSH on no responders
inflight      agent requests this instance waits on, by gateway (a gateway gone settles them)
bus           the API's NATS side: token authority, host targets, operator exec, presence, late results
liveness      gateways that went silent: their agents are marked disconnected
reconciler    settles runs an API left pending (from the agent's ledger, else timed out)
lifecycle     agent install, uninstall, health, token regeneration and pull tokens
agent_health  a ping through the gateway, else an SSH reachability check (used by lifecycle)
probe         adding a host: the SSH worker reaches it and reports its host key
signer        every request that changes a host leaves signed: fleet traffic, not storage
verify        what is checked before an agent is believed (result and hello signatures): pure
              functions over fleet messages
tasks         the owned background tasks the runner, bus and reconciler start
wheel         the agent wheel shipped to hosts by install and pulled by /agent downloads: an
              artefact of the fleet, served by the http layer through the app state
"""
