"""`warlock`: the operator CLI — the dev launcher (`services.dev`), admin commands, NATS requests.

warlock run                       start NATS, API, SSH worker, gateway and a local agent (make run)
warlock run --cluster             the same as a cluster: 3 NATS nodes, 2 APIs on PostgreSQL, 2 gateways
                                  (make cluster); kill any part and watch the rest carry on
warlock agent stop|start|status   stop or start the local agent of a running `warlock run`
warlock token-authority --file F  answer gateways' token checks from a JSON file of token hashes
warlock req SUBJECT [JSON]        send a NATS request as the operator and print the reply (like
                                  `nats req`); an exec is signed with an operator key and sent to
                                  warlock.ops.<host>.exec
warlock nats-config --dir DIR     write one nkey per NATS role and the nats-server config enforcing them
warlock api-key create --name N   create an API key in the API's database; print it once
    [--role read|operate|admin] [--scope K=V]... [--expires 30d|ISO-TIME]   (default: admin, no scope)
warlock agent-token HOST          issue a new agent token for a registered host; print it once
warlock signing-keys create NAME  make an operator signing key (private key to a 0600 file, public
                                  key into the API's database); `signing-keys list`, `signing-keys
                                  revoke NAME`
warlock swarm --gateway URL --tokens F   many simulated agents in one process (benchmark; services.dev.swarm)
warlock hosts|exec|jobs|job|cancel|keys   the operator's commands over the API's REST interface
                                  (typer + rich: `services.ctl.ops`; WARLOCK_API_URL or dev.json)

`api-key`, `agent-token` and `signing-keys` use the API's database (WARLOCK_API_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.dev import control as devcontrol
from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.natsx import describe
from shared.settings import NatsSettings, load_settings, split_servers
from shared.version import __version__

if TYPE_CHECKING:
    from services.ctl.admin import IssuedToken


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warlock", description="Warlock fleet control plane")
    parser.add_argument("--version", action="version", version=f"warlock {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start the whole stack on this machine (what `make run` does)")
    run.add_argument(
        "--cluster",
        action="store_true",
        help="3 clustered NATS nodes, 2 APIs on PostgreSQL (WARLOCK_DATABASE_URL, else database warlock on "
        "127.0.0.1:5432), 2 gateways, the SSH worker and the agent (what `make cluster` does)",
    )
    agent = sub.add_parser(
        "agent", help="stop or start the local agent of a running `warlock run` (watch the SSH fallback)"
    )
    agent.add_argument("action", choices=devcontrol.ACTIONS)
    auth = sub.add_parser("token-authority", help="answer token checks from a JSON file of hashes")
    auth.add_argument("--file", type=Path, required=True, help='JSON: {"hosts": {"<host>": "<sha256>"}}')
    req = sub.add_parser("req", help="send a NATS request and print the reply")
    req.add_argument("subject")
    req.add_argument("data", nargs="?", default="")
    req.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for the reply (default 35; for an exec, its timeout + 45)",
    )
    req.add_argument("--server", help="NATS URL (default: WARLOCK_NATS_URL, else .warlock/dev.json)")
    req.add_argument(
        "--key",
        type=Path,
        help="operator signing key for exec (default: WARLOCK_OPERATOR_KEY, else .warlock/dev.json's "
        "operator_key); make one with `warlock signing-keys create NAME`",
    )
    req.add_argument(
        "--nkey",
        type=Path,
        help="the operator's nkey seed file (default: WARLOCK_NATS_NKEY_FILE, else .warlock/dev.json's "
        "operator_nkey)",
    )
    from shared.natsauth import add_arguments

    add_arguments(sub.add_parser("nats-config", help="write NATS nkeys (one per role) and the server config"))
    keys = sub.add_parser("api-key", help="manage API keys (in WARLOCK_API_DATABASE_URL)")
    keys_sub = keys.add_subparsers(dest="key_cmd", required=True)
    create = keys_sub.add_parser("create", help="create an API key and print it once")
    create.add_argument("--name", required=True, help="a unique name; recorded as requested_by")
    create.add_argument(
        "--role", choices=("read", "operate", "admin"), default="admin", help="default: admin"
    )
    create.add_argument(
        "--scope", action="append", default=[], metavar="K=V", help="label scope (repeatable)"
    )
    create.add_argument("--expires", metavar="WHEN", help="a duration (90m, 12h, 30d, 2w) or an ISO time")
    token = sub.add_parser("agent-token", help="issue a new agent token for a host and print it once")
    token.add_argument("host", help="host id or address (the host must be registered)")
    opkeys = sub.add_parser("signing-keys", help="operator signing keys for `warlock req` (API database)")
    opkeys_sub = opkeys.add_subparsers(dest="keys_cmd", required=True)
    opcreate = opkeys_sub.add_parser("create", help="make a key pair; print where the private key went")
    opcreate.add_argument("name", help="a unique name, recorded as requested_by operator:NAME")
    opcreate.add_argument("--out", type=Path, help="private key file (default ~/.config/warlock/NAME.key)")
    opkeys_sub.add_parser("list", help="list operator keys (name, key id, created, revoked)")
    oprevoke = opkeys_sub.add_parser("revoke", help="revoke a key: the API refuses what it signs")
    oprevoke.add_argument("name")
    swarm = sub.add_parser("swarm", help="hold many simulated agent sessions (benchmark)")
    _swarm_arguments(swarm)
    for name, text in OPS_COMMANDS.items():  # listed in --help; `main` hands them to `services.ctl.ops`
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _swarm_arguments(parser: argparse.ArgumentParser) -> None:
    """`warlock swarm`'s options, without importing the swarm (and websockets) to build the parser."""
    parser.add_argument(
        "--gateway", required=True, help="gateway WebSocket URL, e.g. ws://127.0.0.1:8765/agent"
    )
    parser.add_argument("--tokens", type=Path, required=True, help='JSON file {"<host_id>": "<token>", ...}')
    parser.add_argument("--count", type=int, default=None, help="use only the first N tokens")
    parser.add_argument("--concurrency", type=int, default=100, help="connects in flight at once")
    parser.add_argument(
        "--metrics-interval",
        type=float,
        default=0.0,
        help="seconds between each agent's synthetic samples (0: none)",
    )


def _agent(action: devcontrol.AgentAction) -> int:
    """Ask the running launcher (WARLOCK_DEV_DIR, default .warlock) to stop or start its agent."""
    from services.dev.stack import DevSettings

    settings = load_settings(DevSettings)
    ok, message = devcontrol.ask(settings.dir.resolve() / devcontrol.SOCKET_NAME, action)
    print(message if ok else f"warlock: {message}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _admin(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from services.api.errors import DomainError
    from services.api.settings import ApiSettings
    from services.ctl import admin

    settings = load_settings(ApiSettings)
    try:
        if args.cmd == "api-key":
            print(asyncio.run(admin.create_api_key(settings, args.name, args.role, args.scope, args.expires)))
            return 0
        issued = asyncio.run(admin.issue_agent_token(settings, args.host))
    except DomainError as exc:
        print(f"warlock: {exc.detail}", file=sys.stderr)
        return 1
    except (OSError, SQLAlchemyError) as exc:
        print(f"warlock: database unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(issued.token, flush=True)  # first: the token is valid now, whatever happens next
    return _revoke_previous(issued)


def _keys(args: argparse.Namespace) -> int:
    """`warlock signing-keys create|list|revoke`: operator signing keys in the API's database."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.api.errors import DomainError
    from services.api.settings import ApiSettings
    from services.ctl import admin

    settings = load_settings(ApiSettings)
    try:
        if args.keys_cmd == "create":
            made = asyncio.run(admin.create_operator_key(settings, args.name, args.out))
            print(f"operator key {made.name} (key id {made.key_id}) created")
            print(f"private key: {made.path} (0600; keep it secret: whoever holds it runs commands)")
            print(f"public key: {made.public_key}")
            example = """'{"command":"uptime"}'"""
            print(f"use it: warlock req warlock.ops.<host>.exec {example} --key {made.path}")
        elif args.keys_cmd == "list":
            rows = asyncio.run(admin.list_operator_keys(settings))
            print(f"{'name':<24} {'key id':<16}  {'created':<25}  revoked")
            for row in rows:
                revoked = row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "-"
                created = row.created_at.isoformat(timespec="seconds")
                print(f"{row.name:<24} {row.key_id:<16}  {created:<25}  {revoked}")
        else:
            key = asyncio.run(admin.revoke_operator_key(settings, args.name))
            when = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "?"
            print(f"operator key {key.name} ({key.key_id}) revoked at {when}")
    except DomainError as exc:
        print(f"warlock: {exc.detail}", file=sys.stderr)
        return 1
    except (OSError, SQLAlchemyError) as exc:
        print(f"warlock: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _revoke_previous(issued: IssuedToken) -> int:
    """`warlock agent-token`, after printing the new token: close the host's live sessions, which use a
    replaced token (published on NATS: WARLOCK_NATS_URL, else .warlock/dev.json; gateways close them with
    4003). Exit status 3 (the token is printed and valid, the old one no longer verifies, but its session
    stays up) when NATS cannot be reached."""
    from services.ctl.admin import revoke_sessions

    if issued.previous_hash is None:
        return 0  # the host had no token: no session can be using one
    server, options = _nats_for("api", None, None)
    problem = asyncio.run(revoke_sessions(server, issued.host_id, options))
    if problem is None:
        return 0
    print(
        f"warlock: the new token is valid and the old one no longer verifies, but the live session of "
        f"{issued.host_id} was not closed: {problem}. Run this again with NATS reachable (WARLOCK_NATS_URL), "
        "or restart the gateway holding the session",
        file=sys.stderr,
    )
    return 3


CONNECT_LIMIT_S = 12  # `warlock req`: give up connecting after this long


async def _request(server: str, subject: str, data: str, wait_s: float, options: dict[str, Any]) -> int:
    import nats
    import nats.errors
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    failures: list[str] = []

    async def failed(exc: Exception) -> None:  # one line, not nats-py's default traceback
        failures.append(describe(exc))

    try:
        async with asyncio.timeout(CONNECT_LIMIT_S):  # nats-py can hang after a TLS verification failure
            nc = await nats.connect(
                servers=split_servers(server),
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=5,
                error_cb=failed,
                **options,
            )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        print(
            f"warlock: cannot reach NATS at {server}: {failures[0] if failures else describe(exc)}",
            file=sys.stderr,
        )
        return 1
    try:
        msg = await nc.request(subject, data.encode(), timeout=wait_s)
    except NoRespondersError:
        print(f"warlock: no responders on {subject}", file=sys.stderr)
        return 1
    except NatsTimeout:
        refused = [f for f in failures if "permissions violation" in f.lower()]
        if refused:  # the server dropped the request: this identity may not publish there
            print(f"warlock: NATS refused the request ({refused[0]})", file=sys.stderr)
        else:
            print(f"warlock: no reply on {subject} within {wait_s}s", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    print(msg.data.decode(errors="replace"))
    return 0


REQ_WAIT_S = 35.0  # default wait of `warlock req`
EXEC_EXTRA_WAIT_S = 45.0  # an exec's reply may take its timeout plus the API's agent and SSH graces
OPERATOR_TTL_S = 60.0  # an operator-signed command must reach the API within this
EXEC_KINDS = (("agent", "exec"), ("ops", "exec"))


def _operator_key_file(explicit: Path | None) -> Path | None:
    """--key, else WARLOCK_OPERATOR_KEY, else .warlock/dev.json's operator_key."""
    import os

    if explicit is not None:
        return explicit
    if os.environ.get("WARLOCK_OPERATOR_KEY"):
        return Path(os.environ["WARLOCK_OPERATOR_KEY"])
    named = _dev_info().get("operator_key")
    return Path(named) if isinstance(named, str) else None


class ReqError(Exception):
    """`warlock req` cannot build its request; the message says why (exit 2)."""


def signed_exec(subject: str, data: str, key_file: Path | None) -> tuple[str, str, float | None]:
    """For an exec subject (``warlock.ops.<host>.exec``, or ``warlock.agent.<host>.exec``, which the
    operator identity may not publish: rewritten to the ops subject, said on stderr), the JSON wrapped in
    a request signed with the operator key (kind ``ops_exec``, command id generated if absent). Other
    subjects are returned unchanged. Returns (subject, data, the exec's timeout or None)."""
    from shared import signing, subjects
    from shared.errors import InvalidIdError, ProtocolError
    from shared.ids import new_command_id
    from shared.protocol import ExecRequest, decode_model, encode

    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != subjects.PREFIX or (parts[1], parts[3]) not in EXEC_KINDS:
        return subject, data, None
    try:
        host = subjects.host_id(parts[2])
    except InvalidIdError as exc:
        raise ReqError(str(exc)) from exc
    ops_subject = subjects.ops_exec(host)
    if parts[1] == "agent":
        print(
            f"warlock: {subject} takes only API-signed commands; sending to {ops_subject} instead "
            "(the API checks your operator key, records the command and runs it)",
            file=sys.stderr,
        )
    if key_file is None:
        raise ReqError(
            "an exec must be signed with an operator key: pass --key FILE or set WARLOCK_OPERATOR_KEY "
            "(make one with `warlock signing-keys create NAME`)"
        )
    key = signing.load_private(key_file, "--key / WARLOCK_OPERATOR_KEY")
    try:
        request = decode_model(ExecRequest, data or "{}")
    except ProtocolError as exc:
        raise ReqError(f"not an exec request: {exc.message}") from exc
    if request.signature is not None:
        raise ReqError("the request is already signed; give the plain JSON")
    if request.command_id is None:
        request = request.model_copy(update={"command_id": new_command_id()})
    fields = signing.signed_fields(request)
    signature = signing.sign_command(key, "ops_exec", fields, host, OPERATOR_TTL_S)
    signed = request.model_copy(update={"signature": signature})
    return ops_subject, encode(signed).decode(), request.timeout


DEV_JSON = Path(".warlock/dev.json")


def _dev_info() -> dict[str, Any]:
    """What a running `warlock run` in this directory wrote to .warlock/dev.json ({} if none)."""
    try:
        info = json.loads(DEV_JSON.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _nats_for(role: str, server: str | None, nkey: Path | None) -> tuple[str, dict[str, Any]]:
    """The NATS URL and `nats.connect` options to connect as `role` (``api`` or ``operator``).

    URL: `server`, else ``WARLOCK_NATS_URL``, else dev.json's. Nkey seed file: `nkey`, else
    ``WARLOCK_NATS_NKEY_FILE``, else dev.json's ``<role>_nkey``. CA: ``WARLOCK_NATS_CA_FILE``.
    """
    import os

    from shared.natsauth import NkeyFileError, read_seed
    from shared.natsx import settings_options

    settings = load_settings(NatsSettings)  # checks WARLOCK_NATS_NKEY_FILE / _CA_FILE when set
    dev = _dev_info()
    if not server:
        server = (
            settings.nats_url if "WARLOCK_NATS_URL" in os.environ else dev.get("nats_url", settings.nats_url)
        )
    if nkey is None and settings.nats_nkey_file is None and dev.get(f"{role}_nkey"):
        nkey = Path(dev[f"{role}_nkey"])
    if nkey is not None:
        try:
            read_seed(nkey)
        except NkeyFileError as exc:
            raise ConfigError("nkey file", str(exc)) from None
        settings = settings.model_copy(update={"nats_nkey_file": nkey})
    return str(server), settings_options(settings, role)


OPS_COMMANDS = {  # the commands over the API's REST interface (typer: `services.ctl.ops`)
    "hosts": "the hosts, by label (a table; --json)",
    "exec": "run a command on hosts as one job, with live output and a summary",
    "jobs": "recent jobs",
    "job": "one job: state, counts, every host's outcome",
    "cancel": "cancel a command, or a job (--job)",
    "keys": "API keys over the API: list, create (role, label scope, expiry), revoke",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `warlock` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OPS_COMMANDS:
        from services.ctl import ops

        return ops.main(argv)
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            from services.dev.stack import run_dev_stack

            return run_dev_stack(cluster=args.cluster)
        if args.cmd == "agent":
            return _agent(args.action)
        if args.cmd == "token-authority":
            from services.dev.token_file import run_token_authority

            settings = load_settings(NatsSettings)
            setup_logging(settings.log_level)
            return asyncio.run(
                run_token_authority(
                    settings.nats_url,
                    args.file,
                    nkey_file=settings.nats_nkey_file,
                    ca_file=settings.nats_ca_file,
                )
            )
        if args.cmd in ("api-key", "agent-token"):
            return _admin(args)
        if args.cmd == "signing-keys":
            return _keys(args)
        if args.cmd == "swarm":
            from services.dev import swarm

            setup_logging(load_settings(NatsSettings).log_level)
            return swarm.run(args)
        if args.cmd == "nats-config":
            from shared.natsauth import run as nats_config

            return nats_config(args)
        try:
            subject, data, exec_timeout = signed_exec(args.subject, args.data, _operator_key_file(args.key))
        except ReqError as exc:
            print(f"warlock: {exc}", file=sys.stderr)
            return 2
        wait = args.timeout
        if wait is None:
            wait = REQ_WAIT_S if exec_timeout is None else exec_timeout + EXEC_EXTRA_WAIT_S
        server, options = _nats_for("operator", args.server, args.nkey)
        return asyncio.run(_request(server, subject, data, wait, options))
    except ConfigError as exc:
        print(f"warlock: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
