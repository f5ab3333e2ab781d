"""`warlock`: the dev launcher and admin commands.

warlock run                       start NATS, API, SSH worker, gateway and a local agent (make run)
warlock agent stop|start|status   stop or start the local agent of a running `warlock run`
warlock token-authority --file F  answer gateways' token checks from a JSON file of token hashes
warlock req SUBJECT [JSON]        send a NATS request and print the reply (like `nats req`), as the operator
warlock nats-config --dir DIR     write one nkey per NATS role and the nats-server config enforcing them
warlock api-key create --name N   create an API key in the API's database; print it once
warlock agent-token HOST          issue a new agent token for a registered host; print it once

`api-key` and `agent-token` use the API's database (WARLOCK_API_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.natsx import describe
from shared.settings import NatsSettings, load_settings

from . import __version__, devcontrol

if TYPE_CHECKING:
    from services.api.admin import IssuedToken


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warlock", description="Warlock fleet control plane")
    parser.add_argument("--version", action="version", version=f"warlock {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="start the whole stack on this machine (what `make run` does)")
    agent = sub.add_parser(
        "agent", help="stop or start the local agent of a running `warlock run` (watch the SSH fallback)"
    )
    agent.add_argument("action", choices=devcontrol.ACTIONS)
    auth = sub.add_parser("token-authority", help="answer token checks from a JSON file of hashes")
    auth.add_argument("--file", type=Path, required=True, help='JSON: {"hosts": {"<host>": "<sha256>"}}')
    req = sub.add_parser("req", help="send a NATS request and print the reply")
    req.add_argument("subject")
    req.add_argument("data", nargs="?", default="")
    req.add_argument("--timeout", type=float, default=35.0, help="seconds to wait for the reply")
    req.add_argument("--server", help="NATS URL (default: WARLOCK_NATS_URL, else .warlock/dev.json)")
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
    token = sub.add_parser("agent-token", help="issue a new agent token for a host and print it once")
    token.add_argument("host", help="host id or address (the host must be registered)")
    return parser


def _agent(action: devcontrol.AgentAction) -> int:
    """Ask the running launcher (WARLOCK_DEV_DIR, default .warlock) to stop or start its agent."""
    from .devstack import DevSettings

    settings = load_settings(DevSettings)
    ok, message = devcontrol.ask(settings.dir.resolve() / devcontrol.SOCKET_NAME, action)
    print(message if ok else f"warlock: {message}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _admin(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from services.api import admin
    from services.api.errors import ApiError
    from services.api.settings import ApiSettings

    settings = load_settings(ApiSettings)
    try:
        if args.cmd == "api-key":
            print(asyncio.run(admin.create_api_key(settings, args.name)))
            return 0
        issued = asyncio.run(admin.issue_agent_token(settings, args.host))
    except ApiError as exc:
        print(f"warlock: {exc.detail}", file=sys.stderr)
        return 1
    except (OSError, SQLAlchemyError) as exc:
        print(f"warlock: database unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(issued.token, flush=True)  # first: the token is valid now, whatever happens next
    return _revoke_previous(issued)


def _revoke_previous(issued: IssuedToken) -> int:
    """`warlock agent-token`, after printing the new token: close the host's live sessions, which use a
    replaced token (published on NATS: WARLOCK_NATS_URL, else .warlock/dev.json; gateways close them with
    4003). Exit status 3 (the token is printed and valid, the old one no longer verifies, but its session
    stays up) when NATS cannot be reached."""
    from services.api.admin import revoke_sessions

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
                server,
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `warlock` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            from .devstack import run_dev_stack

            return run_dev_stack()
        if args.cmd == "agent":
            return _agent(args.action)
        if args.cmd == "token-authority":
            from .token_file import run_token_authority

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
        if args.cmd == "nats-config":
            from shared.natsauth import run as nats_config

            return nats_config(args)
        server, options = _nats_for("operator", args.server, args.nkey)
        return asyncio.run(_request(server, args.subject, args.data, args.timeout, options))
    except ConfigError as exc:
        print(f"warlock: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
