"""Who may call the service: bearer tokens, their names, and the check of a request's token.

Why names: the audit log and the metrics must say *which* caller sent a request, and must never
hold a token. So each token has a name, written in the token file as ``name:token`` (a bare
``token`` line is named ``sha256:<first 12 hex digits of its SHA-256>``, which identifies it
without revealing it). A token file holds one token a line; blank lines and ``#`` comments are
skipped; fewer than :data:`MIN_TOKEN_LENGTH` characters, whitespace inside, a name used twice or
the same token twice is refused with the line's number (never its token).

Why digests: the replicas get each token's SHA-256, not the token (the application's arguments
travel through Ray's controller and its checkpoints); a presented token is hashed once and
compared with :func:`hmac.compare_digest` against *every* digest, with no early exit, so the time
an answer takes says neither whether nor which token matched.

Where tokens come from (:func:`resolve_tokens`, shared by `pneumonia serve` and ``build_app``):
the token file given (``--token-file``, the app argument ``token_file``), else
``$PNEUMONIA_TOKEN_FILE``, else ``$PNEUMONIA_TOKENS`` (the file's lines themselves: what a
Kubernetes Secret gives as an environment variable); ``no_auth`` says "open, on purpose".
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pneumonia.errors import PneumoniaError

MIN_TOKEN_LENGTH = 16
TOKEN_FILE_VARIABLE = "PNEUMONIA_TOKEN_FILE"
TOKENS_VARIABLE = "PNEUMONIA_TOKENS"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
NEW_TOKEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one"


@dataclass(frozen=True)
class Token:
    """One caller's token and the name that stands for it in logs and metrics."""

    name: str
    secret: str = field(repr=False)

    @property
    def digest(self) -> str:
        return _sha256(self.secret)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def default_name(secret: str) -> str:
    """The name of a token written without one: a prefix of its SHA-256 (identifies, never reveals)."""
    return f"sha256:{_sha256(secret)[:12]}"


def parse_tokens(text: str, source: str) -> tuple[Token, ...]:
    """The tokens of a token file's ``text`` (``source`` names it in errors); PneumoniaError for an
    empty file or a bad line, naming the line, never the token."""
    tokens: list[Token] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, secret = line.partition(":")
        if not colon:
            name, secret = "", line
        where = f"{source} line {number}"
        if colon and not NAME_PATTERN.match(name):
            raise PneumoniaError(f"{where}: a token's name (before the first ':') must be 1-64 letters, digits, "
                                 "'.', '_', '@' or '-'")
        if any(character.isspace() for character in secret):
            raise PneumoniaError(f"{where}: a token must not contain spaces")
        if len(secret) < MIN_TOKEN_LENGTH:
            raise PneumoniaError(f"{where}: the token is {len(secret)} characters, fewer than {MIN_TOKEN_LENGTH}; "
                                 f"use a long random one ({NEW_TOKEN_HINT})")
        token = Token(name or default_name(secret), secret)
        if any(hmac.compare_digest(token.digest, other.digest) for other in tokens):
            raise PneumoniaError(f"{where}: the same token is listed twice")
        if any(token.name == other.name for other in tokens):
            raise PneumoniaError(f"{where}: the name {token.name!r} is used twice")
        tokens.append(token)
    if not tokens:
        raise PneumoniaError(f"{source} holds no tokens (one a line, 'name:token' or 'token'; {NEW_TOKEN_HINT})")
    return tuple(tokens)


def load_tokens(path: str | Path) -> tuple[Token, ...]:
    """The tokens of the token file at ``path``."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PneumoniaError(f"token file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PneumoniaError(f"cannot read the token file {path}: {getattr(error, 'strerror', None) or error}") from None
    return parse_tokens(text, f"token file {path}")


def resolve_tokens(token_file: str | None = None, no_auth: bool = False,
                   environ: Mapping[str, str] | None = None) -> tuple[Token, ...]:
    """The tokens the service accepts (empty: no authentication): ``token_file``, else
    $PNEUMONIA_TOKEN_FILE, else $PNEUMONIA_TOKENS; none with ``no_auth``."""
    environ = os.environ if environ is None else environ
    if no_auth:
        if token_file:
            raise PneumoniaError("a token file and no_auth (--no-auth) contradict each other: give one")
        return ()
    if token_file:
        return load_tokens(token_file)
    if environ.get(TOKEN_FILE_VARIABLE) and environ.get(TOKENS_VARIABLE):
        raise PneumoniaError(f"both ${TOKEN_FILE_VARIABLE} and ${TOKENS_VARIABLE} are set: set one")
    if environ.get(TOKEN_FILE_VARIABLE):
        return load_tokens(environ[TOKEN_FILE_VARIABLE])
    if environ.get(TOKENS_VARIABLE):
        return parse_tokens(environ[TOKENS_VARIABLE], f"${TOKENS_VARIABLE}")
    return ()


def token_digests(tokens: tuple[Token, ...]) -> dict[str, str]:
    """name -> SHA-256 of the token: what the replicas get (see the module docstring)."""
    return {token.name: token.digest for token in tokens}


class Authenticator:
    """Checks ``Authorization: Bearer <token>`` against the digests of the accepted tokens."""

    def __init__(self, digests: Mapping[str, str]):
        if not digests:
            raise ValueError("an Authenticator needs at least one token")
        self._digests = [(name, bytes.fromhex(digest)) for name, digest in digests.items()]

    def identify(self, authorization: str | None) -> tuple[str | None, str]:
        """(the token's name, "ok") for a valid bearer token, else (None, why): "missing" (no
        bearer token at all) or "invalid". Every digest is compared, whatever matched."""
        scheme, _, presented = (authorization or "").strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return None, "missing"
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, expected in self._digests:
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return (found, "ok") if found is not None else (None, "invalid")


def is_loopback(host: str) -> bool:
    """Whether serving on ``host`` is reachable from this machine only (127.0.0.0/8, ::1, or a name
    that resolves to them alone); socket.gaierror for a name that does not resolve."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    return bool(addresses) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)
