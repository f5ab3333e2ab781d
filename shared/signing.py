"""Ed25519 keys and signatures: commands signed by the API, results and hellos signed by the agent.

Keys
    A private key is a PKCS#8 PEM file (0600), readable by ``openssl pkey``. A public key travels as text,
    ``ed25519:<base64url of the 32 raw bytes, no padding>``; its `key_id` is the first 16 hex characters
    of the SHA-256 of those bytes.

Commands (`sign_command` / `verify_command`)
    Everything that changes a host carries a `CommandSignature`: the host it is for, the signer's key id,
    issued-at and not-after, and an Ed25519 signature over the canonical bytes of the command's own
    fields (`command_bytes`). A verifier rebuilds those bytes from the fields it received, so a gateway
    or anyone on the bus that changes a field, the host, or the validity window breaks the signature.

Results (`sign_result` / `verify_result`)
    The agent signs the outcome of a command: host, command id, exit code, signal, flags, timing and the
    SHA-256 of stdout and stderr (`result_bytes`); ``cancelled`` only when set (a cancel killed it).

Command kinds: ``exec``, ``ssh_exec``, ``ops_exec``, ``rotate``, ``result_query``, ``install``,
``uninstall``, ``configure``, ``probe``, ``cancel`` (``{command_id}``: the agent kills that running
command) and ``ssh_cancel`` (``{command_id, target}``: the SSH worker kills it on the signed target).

Ed25519 comes from PyNaCl (libsodium): it costs the agent ~1 MiB of RSS where `cryptography` costs ~10.

Canonical bytes are a domain prefix plus compact JSON with sorted keys (``ensure_ascii``), computed from
validated field values on both sides; floats are rendered by Python's shortest round-trip repr.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey as Ed25519PrivateKey
from nacl.signing import VerifyKey as Ed25519PublicKey

from shared.errors import ConfigError, ErrorCode, WarlockError
from shared.protocol import CommandSignature, ExecResult, Hello, Message, ResultAnswer

PUBLIC_PREFIX = "ed25519:"
COMMAND_DOMAIN = b"warlock-command/1\n"
RESULT_DOMAIN = b"warlock-result/1\n"
HELLO_DOMAIN = b"warlock-hello/1\n"
ROTATED_DOMAIN = b"warlock-token-rotated/1\n"
ANSWER_DOMAIN = b"warlock-result-answer/1\n"
DEFAULT_COMMAND_TTL_S = 120.0  # a signed command must reach its host within this
CLOCK_SKEW_S = 300.0  # a not-after this far beyond the verifier's own limit is refused


class CommandRefused(WarlockError):
    """A signed command did not verify; `code` is the typed error to answer with. Nothing ran."""

    def __init__(self, code: ErrorCode, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


# ----------------------------------------------------------------------------- keys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# PKCS#8 of an Ed25519 key is this fixed DER prefix followed by the 32-byte seed (RFC 8410).
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BEGIN, _PEM_END = "-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----"


def generate() -> Ed25519PrivateKey:
    """A new private key."""
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """The PKCS#8 PEM of `key` (``openssl pkey`` reads it)."""
    der = base64.b64encode(_PKCS8_PREFIX + bytes(key)).decode()
    return f"{_PEM_BEGIN}\n{der}\n{_PEM_END}\n".encode()


def _from_pem(data: bytes) -> Ed25519PrivateKey:
    text = data.decode("ascii").strip()
    if not (text.startswith(_PEM_BEGIN) and text.endswith(_PEM_END)):
        raise ValueError("not a PEM private key")
    der = base64.b64decode("".join(text[len(_PEM_BEGIN) : -len(_PEM_END)].split()), validate=True)
    if len(der) != 48 or not der.startswith(_PKCS8_PREFIX):
        raise ValueError("not an Ed25519 key")
    return Ed25519PrivateKey(der[16:])


def save_private(path: Path, key: Ed25519PrivateKey) -> None:
    """Write `key` to `path` (0600, created exclusively: an existing key is never overwritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem(key))


def load_private(path: Path, field: str = "signing_key_file") -> Ed25519PrivateKey:
    """Read a private key file; ConfigError naming `field` if it is missing, unreadable or not Ed25519."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        key = _from_pem(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(field, f"{path} is not an Ed25519 PEM private key") from exc
    if path.stat().st_mode & 0o077:
        raise ConfigError(field, f"{path} is readable by group or others; chmod 600 it")
    return key


def ensure_private(path: Path, field: str = "signing_key_file") -> tuple[Ed25519PrivateKey, bool]:
    """Load the key at `path`, creating it first if there is none; return (key, created)."""
    try:
        save_private(path, generate())
        created = True
    except FileExistsError:
        created = False
    return load_private(path, field), created


def public_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """``ed25519:<base64url>`` of the public half of `key`."""
    public = key.verify_key if isinstance(key, Ed25519PrivateKey) else key
    return PUBLIC_PREFIX + _b64(bytes(public))


def parse_public(text: str) -> Ed25519PublicKey:
    """Parse ``ed25519:<base64url>``; ValueError if it is not a 32-byte Ed25519 public key."""
    if not text.startswith(PUBLIC_PREFIX):
        raise ValueError(f"a public key starts with {PUBLIC_PREFIX!r}")
    try:
        raw = _unb64(text[len(PUBLIC_PREFIX) :])
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64url") from exc
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey(raw)


def key_id(key: str | Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The 16-hex-character id of a public key (text form or key object)."""
    text = key if isinstance(key, str) else public_text(key)
    return hashlib.sha256(_unb64(text[len(PUBLIC_PREFIX) :])).hexdigest()[:16]


class TrustedKeys:
    """The public keys a verifier accepts, by key id (more than one, so the signer's key can rotate)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self.keys: dict[str, Ed25519PublicKey] = {}
        for text in keys:
            self.keys[key_id(text)] = parse_public(text)

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, kid: str) -> Ed25519PublicKey | None:
        """The key with id `kid`, if trusted."""
        return self.keys.get(kid)


# ----------------------------------------------------------------------------- commands


def _canonical(domain: bytes, values: Mapping[str, Any]) -> bytes:
    return domain + json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def command_bytes(
    kind: str, fields: Mapping[str, Any], host_id: str, key: str, issued_at: float, not_after: float
) -> bytes:
    """The bytes a command signature covers: its kind, host, validity, signer and every field."""
    values = {"kind": kind, "host_id": host_id, "key_id": key, "issued_at": issued_at, "not_after": not_after}
    clash = values.keys() & fields.keys()
    if clash:
        raise ValueError(f"command fields may not be named {sorted(clash)}")
    return _canonical(COMMAND_DOMAIN, {**values, "fields": dict(fields)})


def sign_command(
    key: Ed25519PrivateKey,
    kind: str,
    fields: Mapping[str, Any],
    host_id: str,
    ttl: float = DEFAULT_COMMAND_TTL_S,
    now: float | None = None,
) -> CommandSignature:
    """Sign a command of `kind` for `host_id`, valid from now for `ttl` seconds."""
    issued = time.time() if now is None else now
    not_after = issued + ttl
    kid = key_id(key)
    sig = key.sign(command_bytes(kind, fields, host_id, kid, issued, not_after)).signature
    return CommandSignature(host_id=host_id, key_id=kid, issued_at=issued, not_after=not_after, sig=_b64(sig))


def verify_command(
    kind: str,
    fields: Mapping[str, Any],
    signature: CommandSignature | None,
    trusted: TrustedKeys,
    host_id: str,
    max_ttl: float,
    now: float | None = None,
) -> str:
    """Check a signed command meant for `host_id`; return the signer's key id or raise CommandRefused.

    Refused: no signature (`unsigned`), a key not in `trusted` (`unknown_key`), a signature that does not
    cover these fields (`bad_signature`), another host (`wrong_host`), past its not-after or valid for
    longer than `max_ttl` from now, which would let it outlive the replay record (`expired`).
    """
    if signature is None:
        raise CommandRefused(
            ErrorCode.UNSIGNED,
            f"unsigned {kind}: commands must be signed by the API (or sent with `warlock req` and an "
            "operator key the API authorised: warlock signing-keys create NAME); nothing ran",
        )
    public = trusted.get(signature.key_id)
    if public is None:
        raise CommandRefused(
            ErrorCode.UNKNOWN_KEY, f"{kind} signed by key {signature.key_id}, which is not trusted here"
        )
    data = command_bytes(
        kind, fields, signature.host_id, signature.key_id, signature.issued_at, signature.not_after
    )
    try:
        public.verify(data, _unb64(signature.sig))
    except (BadSignatureError, ValueError) as exc:
        raise CommandRefused(ErrorCode.BAD_SIGNATURE, f"{kind}: the signature does not match") from exc
    if signature.host_id != host_id:
        raise CommandRefused(
            ErrorCode.WRONG_HOST, f"{kind} signed for host {signature.host_id}, not {host_id}"
        )
    clock = time.time() if now is None else now
    if clock > signature.not_after:
        late = clock - signature.not_after
        raise CommandRefused(ErrorCode.EXPIRED, f"{kind} expired {late:.1f}s ago (check the clocks)")
    if signature.not_after > clock + max_ttl + CLOCK_SKEW_S:
        raise CommandRefused(
            ErrorCode.EXPIRED, f"{kind} is valid for longer than the {max_ttl:g}s this host remembers ids"
        )
    return signature.key_id


# ----------------------------------------------------------------------------- results


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def result_bytes(host_id: str, result: ExecResult) -> bytes:
    """The bytes an agent signs for `result`: its outcome and the digests of its output."""
    values = {
        "host_id": host_id,
        "command_id": result.command_id,
        "exit_code": result.exit_code,
        "signal": result.signal,
        "truncated": result.truncated,
        "timed_out": result.timed_out,
        "duration_us": round(result.duration_ms * 1000),
        "stdout_sha256": _digest(result.stdout),
        "stderr_sha256": _digest(result.stderr),
        "via": result.via,
    }
    if result.cancelled:  # only when set: the bytes of every other result are unchanged
        values["cancelled"] = True
    return _canonical(RESULT_DOMAIN, values)


def sign_result(key: Ed25519PrivateKey, host_id: str, result: ExecResult) -> ExecResult:
    """`result` with the agent's signature."""
    return result.model_copy(update={"signature": _b64(key.sign(result_bytes(host_id, result)).signature)})


def verify_result(public: Ed25519PublicKey, host_id: str, result: ExecResult) -> bool:
    """Whether `result` carries a valid signature of `public` for `host_id`."""
    return _verify(public, result.signature, result_bytes(host_id, result))


def sign_values(key: Ed25519PrivateKey, domain: bytes, values: Mapping[str, Any]) -> str:
    """Sign a small mapping (hello, token rotation) under `domain`; the signature as base64url."""
    return _b64(key.sign(_canonical(domain, values)).signature)


def verify_values(
    public: Ed25519PublicKey, domain: bytes, values: Mapping[str, Any], sig: str | None
) -> bool:
    """Whether `sig` signs `values` under `domain` with `public`."""
    return _verify(public, sig, _canonical(domain, values))


def _verify(public: Ed25519PublicKey, sig: str | None, data: bytes) -> bool:
    if not sig:
        return False
    try:
        public.verify(data, _unb64(sig))
    except (BadSignatureError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------- which fields are signed

UNSIGNED_FIELDS = frozenset({"v", "type", "signature", "host_id", "wheel_b64"})


def signed_fields(message: Message) -> dict[str, Any]:
    """The fields of `message` a command signature covers: all but the envelope's own and the wheel body.

    `host_id` is covered by the signature itself; the wheel travels as base64 but its SHA-256 is signed
    and checked on the host before anything is changed. An `ExecRequest` and the `Exec` frame the gateway
    makes from it give the same mapping (command_id, command, timeout).
    """
    return message.model_dump(mode="json", exclude=set(UNSIGNED_FIELDS))


def hello_values(hello: Hello) -> dict[str, Any]:
    """What an agent signs in its hello (`signed_at` stamps it; the API checks it against the pinned key)."""
    return {
        "host_id": hello.host_id,
        "hostname": hello.hostname,
        "platform": hello.platform,
        "agent_version": hello.agent_version,
        "signed_at": hello.signed_at,
    }


HELLO_MAX_AGE_S = CLOCK_SKEW_S  # a hello signed longer ago than this (or in the future) is stale


def hello_problem(public: Ed25519PublicKey, hello: Hello, now: float | None = None) -> str | None:
    """None when `hello` is signed by `public` within `HELLO_MAX_AGE_S` of `now`; else the reason.

    One check for both readers of a hello: the gateway (before it opens a session) and the API (before it
    records the agent connected).
    """
    if hello.signature is None or hello.signed_at is None:
        return "the hello is not signed by the agent"
    if not verify_values(public, HELLO_DOMAIN, hello_values(hello), hello.signature):
        return "the hello does not verify with the agent's key (forged or altered)"
    age = (time.time() if now is None else now) - hello.signed_at
    if abs(age) > HELLO_MAX_AGE_S:
        return f"the hello was signed {age:.0f}s from now (more than {HELLO_MAX_AGE_S:g}s: replayed or clock)"
    return None


def rotated_values(host_id: str, rotation_id: str, token_sha256: str) -> dict[str, Any]:
    """What an agent signs when it made itself a new token: the gateway cannot substitute its own."""
    return {"host_id": host_id, "rotation_id": rotation_id, "token_sha256": token_sha256}


def answer_values(host_id: str, answer: ResultAnswer) -> dict[str, Any]:
    """What an agent signs in its answer to a result query: the query it answers, the state, and what the
    state rests on (the recorded error, or the signature of the recorded result, which covers the result)."""
    error = answer.error
    return {
        "host_id": host_id,
        "query_id": answer.query_id,
        "command_id": answer.command_id,
        "state": answer.state,
        "error_code": None if error is None else str(error.code),
        "error_description": None if error is None else error.description,
        "result_signature": None if answer.result is None else answer.result.signature,
    }


def sign_answer(key: Ed25519PrivateKey, host_id: str, answer: ResultAnswer) -> ResultAnswer:
    """`answer` with the agent's signature (`answer_values`)."""
    sig = sign_values(key, ANSWER_DOMAIN, answer_values(host_id, answer))
    return answer.model_copy(update={"signature": sig})


def answer_problem(public: Ed25519PublicKey, host_id: str, query_id: str, answer: ResultAnswer) -> str | None:
    """None when `answer` is the agent's (`public`) answer to query `query_id` about a command of `host_id`,
    with a recorded result that verifies too; else why not."""
    if answer.query_id != query_id:
        return f"the answer is to another query ({answer.query_id})"
    if not verify_values(public, ANSWER_DOMAIN, answer_values(host_id, answer), answer.signature):
        return "the answer is not signed by the host's agent key (forged or altered)"
    if answer.result is not None:
        if answer.result.command_id != answer.command_id:
            return "the answer carries the result of another command"
        if not verify_result(public, host_id, answer.result):
            return "the recorded result in the answer does not verify with the host's agent key"
    return None
