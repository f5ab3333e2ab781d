"""Agent token helpers: 32 random bytes as 64 hex characters, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

TOKEN_BYTES = 32
_TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")


def generate_token() -> str:
    """Return a new token: 32 random bytes as 64 lowercase hex characters."""
    return secrets.token_hex(TOKEN_BYTES)


def is_well_formed(token: str) -> bool:
    """Return whether `token` has the shape of a token (64 lowercase hex characters)."""
    return _TOKEN_RE.fullmatch(token) is not None


def hash_token(token: str) -> str:
    """Return the SHA-256 hex digest stored at rest in place of `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


def verify_token(token: str, stored_hash: str) -> bool:
    """Return whether `token` hashes to `stored_hash`, compared in constant time."""
    return hmac.compare_digest(hash_token(token).encode(), stored_hash.encode())


def hashes_equal(a: str, b: str) -> bool:
    """Compare two token hashes in constant time."""
    return hmac.compare_digest(a.encode(), b.encode())


def fingerprint(token_hash: str) -> str:
    """Return a short, log-safe fingerprint of a token given its hash (8 hex digits).

    It hashes the hash again, so a log line carries neither the token nor a prefix of the stored hash.
    """
    return hash_token(token_hash)[:8]
