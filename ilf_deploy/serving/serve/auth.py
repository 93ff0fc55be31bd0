"""API keys for `ilf-deploy serve`: `Authorization: Bearer KEY`, as OpenAI's clients send it.

Keys come from a file (`--api-key-file`, one key per line) or the `ILF_API_KEYS` environment
variable (comma- or newline-separated), never from the command line, where `ps` would show them.
Each key may carry a name (`alice:KEY`): the name, never the key, is what metrics and logs show.
Only SHA-256 digests of the keys are kept; a presented key is hashed and compared with every digest
in constant time, so neither the comparison nor the number of keys tried tells a key's prefix.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ilf_deploy.core.errors import ConfigError

ENV_VAR = "ILF_API_KEYS"
MIN_KEY_CHARS = 16
# RFC 6750 b64token: what may follow "Bearer " (so no ':', ',' or whitespace inside a key).
KEY_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_TOKEN_CHARS = 4096  # longer Authorization values are refused without hashing them

# The one comparison of secrets in this module (tests check that it is the constant-time one).
constant_time_compare = hmac.compare_digest


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = field(repr=False)  # sha256 of the key; repr=False keeps it out of tracebacks


def _digest(key: str) -> bytes:
    # Any str hashes (a header decoded as latin-1 may hold anything); valid keys are ASCII anyway.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys; empty means the server is open (the default, for loopback use)."""

    keys: tuple[ApiKey, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.keys)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key in an `Authorization: Bearer KEY` header value, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
            return None
        presented, match = _digest(token), None
        for key in self.keys:  # no early exit: every request costs the same whichever key matched
            if constant_time_compare(presented, key.digest):
                match = key.name
        return match

    @classmethod
    def parse(cls, entries: Iterable[tuple[str, str]]) -> ApiKeys:
        """Keys from `(where, entry)` pairs, an entry being `KEY` or `NAME:KEY`."""
        keys: list[ApiKey] = []
        digests: set[bytes] = set()
        for where, entry in entries:
            name, sep, key = entry.partition(":")
            if not sep:
                name, key = f"key{len(keys) + 1}", entry
            if not NAME_PATTERN.fullmatch(name):
                raise ConfigError(f"{where}: a key name must be 1-64 of A-Z a-z 0-9 _ . - (got {name!r})")
            if not KEY_PATTERN.fullmatch(key):
                # The key itself is never echoed: it may be a real one with a typo.
                raise ConfigError(
                    f"{where}: a key may hold only A-Z a-z 0-9 - . _ ~ + / (and trailing =); "
                    "no spaces, ':' or ','"
                )
            if len(key) < MIN_KEY_CHARS:
                raise ConfigError(
                    f"{where}: key {name!r} is shorter than {MIN_KEY_CHARS} characters; make one with "
                    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
            if name in (k.name for k in keys):
                raise ConfigError(f"{where}: the key name {name!r} is used twice")
            digest = _digest(key)
            if digest in digests:
                raise ConfigError(f"{where}: key {name!r} repeats an earlier key")
            digests.add(digest)
            keys.append(ApiKey(name, digest))
        return cls(tuple(keys))


def load_keys(key_file: Path | None = None, env_value: str | None = None) -> ApiKeys:
    """Keys from `--api-key-file` (one per line; blank lines and `#` comments skipped) and from
    the value of `ILF_API_KEYS` (comma- or newline-separated); both may be given."""
    entries: list[tuple[str, str]] = []
    if key_file is not None:
        try:
            text = Path(key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"--api-key-file {key_file}: cannot read it ({exc.__class__.__name__})"
            ) from None
        lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
        found = [(f"{key_file}:{n}", line) for n, line in lines if line and not line.startswith("#")]
        if not found:
            raise ConfigError(f"--api-key-file {key_file} holds no keys")
        entries += found
    if env_value is not None and env_value.strip():
        parts = [part.strip() for part in re.split(r"[,\n]", env_value)]
        entries += [(f"{ENV_VAR} entry {n}", part) for n, part in enumerate(parts, 1) if part]
    return ApiKeys.parse(entries)


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, keys: ApiKeys, require_auth: bool, tls: bool = False) -> str | None:
    """Refuse (`--require-auth` without keys) or warn about a reachable server; returns the warning."""
    if not keys and require_auth:
        raise ConfigError(f"--require-auth: no API keys (give --api-key-file FILE or set {ENV_VAR})")
    if is_loopback(host):  # only this machine can connect (a TLS proxy in front, typically)
        return None
    if not keys:
        return (
            f"serving on {host} without API keys: anyone who can reach this port can use its compute "
            f"(give --api-key-file FILE or set {ENV_VAR}; --require-auth makes this an error)"
        )
    if not tls:
        return (
            f"serving on {host} over plain HTTP: API keys cross the network readable "
            "(terminate TLS in a reverse proxy, or give --ssl-keyfile and --ssl-certfile)"
        )
    return None
