"""What signing costs per command, measured on `shared.signing` directly (PyNaCl / libsodium).

Every REST → agent command pays four operations: the API signs the exec request, the agent verifies it,
the agent signs its result (over the SHA-256 of stdout and stderr), the API verifies that. Each is timed
on its own, many times, on the real message types; the figure is the median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from shared import signing
from shared.ids import new_command_id
from shared.protocol import ExecRequest, ExecResult

HOST = "bench-agent"


def _median_us(fn: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def signing_cost(n: int = 2000) -> dict[str, float]:
    """Median microseconds of each of the four operations of one command."""
    api_key, agent_key = signing.generate(), signing.generate()
    trusted = signing.TrustedKeys([signing.public_text(api_key)])
    agent_public = agent_key.verify_key
    request = ExecRequest(command="true", timeout=10, command_id=new_command_id())
    fields = signing.signed_fields(request)
    signature = signing.sign_command(api_key, "exec", fields, HOST)
    result = ExecResult(command_id=request.command_id or "", exit_code=0, duration_ms=1.5, stdout="")
    signed = signing.sign_result(agent_key, HOST, result)

    def verify_exec() -> str:
        return signing.verify_command("exec", signing.signed_fields(request), signature, trusted, HOST, 600)

    costs = {
        "API signs the exec request": _median_us(
            lambda: signing.sign_command(api_key, "exec", signing.signed_fields(request), HOST), n
        ),
        "agent verifies it": _median_us(verify_exec, n),
        "agent signs its result": _median_us(lambda: signing.sign_result(agent_key, HOST, result), n),
        "API verifies the result": _median_us(lambda: signing.verify_result(agent_public, HOST, signed), n),
    }
    if not signing.verify_result(agent_public, HOST, signed):
        raise RuntimeError("the benchmark's own result does not verify")
    return costs


def print_signing_cost(n: int = 2000) -> None:
    """Print the per-command signing cost as a Markdown table."""
    costs = signing_cost(n)
    print(f"\n## Signing per command (Ed25519, PyNaCl; median of {n} each)\n")
    print("| operation | µs |")
    print("| --- | ---: |")
    for name, us in costs.items():
        print(f"| {name} | {us:.1f} |")
    print(f"\nSign and verify cost per command: **{sum(costs.values()):.0f} µs** in all", end=" ")
    api_side = costs["API signs the exec request"] + costs["API verifies the result"]
    print(f"({api_side:.0f} µs in the API, the rest on the host).", flush=True)
