"""Sans-I/O side of agent install / configure / uninstall over SSH: plans and the scripts' report.

A request becomes an `OpPlan`: the files to copy into a private temporary directory on the host (the
wheel, the script from `shared.install`, the CA certificate), and the ``WARLOCK_*`` variables (set as
quoted ``VAR=value`` words on the remote command line, since sshd may refuse ``AcceptEnv``). Nothing
secret travels: install and configure make the agent's token on the host (``WARLOCK_MAKE_TOKEN=1``) and
its key (``warlock-agent keygen``), and report only the token's SHA-256 and the public key. The script's
stdout (``STEP`` / ``AGENT_PUBLIC_KEY`` / ``TOKEN_SHA256`` / ``STATE`` lines, see
``shared/install/common.sh``) becomes an `AgentOpResult`, or a `ScriptFailed` naming the failed step.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import shlex
from dataclasses import dataclass, field
from typing import get_args

from services.fallback_ssh.errors import InvalidRequest, ScriptFailed
from shared.install import script
from shared.protocol import (
    AgentConfigureRequest,
    AgentInstallRequest,
    AgentOpResult,
    AgentUninstallRequest,
    InstallStep,
)

AgentOpRequest = AgentInstallRequest | AgentConfigureRequest | AgentUninstallRequest
OP_MODELS: dict[str, type[AgentOpRequest]] = {
    "install": AgentInstallRequest,
    "configure": AgentConfigureRequest,
    "uninstall": AgentUninstallRequest,
}
STATES = frozenset(get_args(AgentOpResult.model_fields["state"].annotation))
TEMP_DIR = re.compile(r"^/[A-Za-z0-9_./-]+$")
PUBLIC_KEY = re.compile(r"^AGENT_PUBLIC_KEY (ed25519:[A-Za-z0-9_-]{43})$")
TOKEN_SHA256 = re.compile(r"^TOKEN_SHA256 ([0-9a-f]{64})$")
CA_NAME = "ca.pem"


@dataclass(frozen=True)
class Upload:
    """A file copied into the host's temporary directory before the script runs."""

    name: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class OpPlan:
    """What to copy and run on the host for one agent operation."""

    op: str
    script_name: str
    uploads: tuple[Upload, ...]
    env: tuple[tuple[str, str], ...]  # nothing secret; "{dir}" in a value is the temporary directory

    def command(self, temp_dir: str, timeout_s: float) -> str:
        """The remote command line: run the script from `temp_dir` with the variables set, under a timeout.

        Nothing secret is in it (there is no secret): the login shell and ``ps`` see only these words.
        """
        if not TEMP_DIR.match(temp_dir):
            raise ScriptFailed(f"mktemp answered an unusable directory name: {temp_dir[:200]!r}")
        assignments = " ".join(
            f"{name}={shlex.quote(value.replace('{dir}', temp_dir))}" for name, value in self.env
        )
        script_path = shlex.quote(f"{temp_dir}/{self.script_name}")
        return (
            f"cd {shlex.quote(temp_dir)} && {assignments} "
            f"exec timeout -s KILL {max(int(timeout_s), 1)} /bin/sh {script_path}"
        )

    def stdin(self) -> bytes:
        """What the script reads on stdin: nothing (no token travels)."""
        return b""


def wheel_bytes(request: AgentInstallRequest) -> bytes:
    """The request's wheel, decoded and checked against its SHA-256; InvalidRequest otherwise."""
    try:
        data = base64.b64decode(request.wheel_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("wheel_b64 is not valid base64; nothing was sent to the host") from exc
    if not data:
        raise InvalidRequest("wheel_b64 is empty; nothing was sent to the host")
    actual = hashlib.sha256(data).hexdigest()
    if actual != request.wheel_sha256:
        raise InvalidRequest(
            f"the wheel's SHA-256 is {actual}, not wheel_sha256 {request.wheel_sha256}; "
            "nothing was sent to the host"
        )
    return data


def _trust(
    request: AgentInstallRequest | AgentConfigureRequest,
) -> tuple[tuple[Upload, ...], tuple[tuple[str, str], ...]]:
    """The CA upload (if any) and the trust variables of an install or configure."""
    uploads: tuple[Upload, ...] = ()
    env: list[tuple[str, str]] = [
        ("WARLOCK_TRUSTED_KEYS", ",".join(request.trusted_keys)),
        ("WARLOCK_MAKE_TOKEN", "1"),
    ]
    if request.ca_pem is not None:
        if "-----BEGIN CERTIFICATE-----" not in request.ca_pem:
            raise InvalidRequest("ca_pem is not a PEM certificate; nothing was sent to the host")
        uploads = (Upload(CA_NAME, request.ca_pem.encode()),)
        env.append(("WARLOCK_CA_PEM_FILE", f"{{dir}}/{CA_NAME}"))
    return uploads, tuple(env)


def plan(request: AgentOpRequest) -> OpPlan:
    """The plan for `request` (InvalidRequest when it cannot be carried out; nothing is sent then)."""
    if isinstance(request, AgentInstallRequest):
        wheel = wheel_bytes(request)
        ca, trust = _trust(request)
        return OpPlan(
            op="install",
            script_name="install.sh",
            uploads=(
                Upload(request.wheel_name, wheel),
                Upload("install.sh", script("install.sh").encode()),
                *ca,
            ),
            env=(
                ("WARLOCK_PREFIX", request.prefix),
                ("WARLOCK_HOST_ID", request.host_id),
                ("WARLOCK_GATEWAY_URLS", ",".join(request.gateway_urls)),
                ("WARLOCK_WHEEL", f"{{dir}}/{request.wheel_name}"),
                ("WARLOCK_WHEEL_SHA256", request.wheel_sha256),
                ("WARLOCK_MODE", request.mode),
                *trust,
            ),
        )
    if isinstance(request, AgentConfigureRequest):
        ca, trust = _trust(request)
        return OpPlan(
            op="configure",
            script_name="configure.sh",
            uploads=(Upload("configure.sh", script("configure.sh").encode()), *ca),
            env=(
                ("WARLOCK_PREFIX", request.prefix),
                ("WARLOCK_HOST_ID", request.host_id),
                ("WARLOCK_GATEWAY_URLS", ",".join(request.gateway_urls)),
                *trust,
            ),
        )
    return OpPlan(
        op="uninstall",
        script_name="uninstall.sh",
        uploads=(Upload("uninstall.sh", script("uninstall.sh").encode()),),
        env=(("WARLOCK_PREFIX", request.prefix),),
    )


def _step(line: str) -> InstallStep | None:
    """``STEP <name> ok|fail <detail>`` as an InstallStep; None for any other line."""
    parts = line.split(" ", 3)
    if len(parts) < 3 or parts[0] != "STEP" or parts[2] not in ("ok", "fail"):
        return None
    return InstallStep(
        name=parts[1][:64], ok=parts[2] == "ok", detail=(parts[3] if len(parts) > 3 else "")[:4096]
    )


def _state(line: str) -> tuple[str, bool] | None:
    """``STATE <state> systemd=<0|1>`` as (state, systemd); None for any other line."""
    parts = line.split()
    if len(parts) != 3 or parts[0] != "STATE" or parts[1] not in STATES:
        return None
    if parts[2] not in ("systemd=0", "systemd=1"):
        return None
    return parts[1], parts[2] == "systemd=1"


def parse_report(
    op_plan: OpPlan,
    stdout: str,
    stderr: str,
    exit_status: int | None,
    first_steps: tuple[InstallStep, ...] = (),
) -> AgentOpResult:
    """The script's report as an AgentOpResult, or ScriptFailed when it ended without a STATE line.

    A STATE line wins over the exit status (``no_systemd`` exits 3 and is an answer, not a failure).
    """
    steps: list[InstallStep] = list(first_steps)
    final: tuple[str, bool] | None = None
    public_key: str | None = None
    token_sha256: str | None = None
    for line in stdout.splitlines():
        step = _step(line)
        if step is not None:
            steps.append(step)
        elif (state := _state(line)) is not None:
            final = state
        elif found := PUBLIC_KEY.match(line):
            public_key = found.group(1)
        elif found := TOKEN_SHA256.match(line):
            token_sha256 = found.group(1)
    if final is not None:
        return AgentOpResult.model_validate(
            {
                "steps": steps,
                "state": final[0],
                "systemd": final[1],
                "agent_public_key": public_key,
                "token_sha256": token_sha256,
            }
        )
    failed = [s for s in steps if not s.ok]
    if failed:
        reason = f"step {failed[-1].name} failed: {failed[-1].detail}"
    else:
        tail = " | ".join((stderr.strip() or stdout.strip()).splitlines()[-5:])
        reason = f"it ended without a final state: {tail or 'no output'}"
    raise ScriptFailed(f"{op_plan.op} failed (exit status {exit_status}): {reason}")
