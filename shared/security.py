"""API keys with roles and CORS origins, parsed from settings and refused when malformed."""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "operator")
MIN_KEY_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces, as a header carries it
_ORIGIN = re.compile(r"^https?://[^/\s?#]+$")


class ConfigurationError(Exception):
    """A setting that cannot work: the service refuses to start (exit code 2)."""


@dataclass(frozen=True)
class ApiKey:
    """One client: its name is the actor recorded in the events it causes."""

    name: str
    key: str = field(repr=False)
    role: Role

    @property
    def can_command(self) -> bool:
        return self.role == "operator"


def parse_api_keys(raw: object) -> tuple[ApiKey, ...]:
    """`name:KEY:role,...` (roles: viewer, operator); errors name the entry, never the key."""
    if raw is None or isinstance(raw, tuple | list):
        return tuple(raw or ())
    if not isinstance(raw, str):
        raise ValueError("must be a string like 'frontend:KEY:operator,grafana:KEY:viewer'")
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    keys = tuple(_parse_entry(i, e) for i, e in enumerate(entries, 1))
    _no_duplicates("name", [k.name for k in keys])
    _no_duplicates("key", [k.key for k in keys])
    return keys


def _parse_entry(index: int, entry: str) -> ApiKey:
    parts = entry.split(":")
    name = parts[0] if _NAME.match(parts[0]) else "?"
    where = f"entry {index} ({name!r})"
    if len(parts) != 3:
        raise ValueError(f"{where} must be NAME:KEY:ROLE, found {len(parts)} part(s)")
    name, key, role = parts
    if not _NAME.match(name):
        raise ValueError(f"{where}: the name must be 1-64 of A-Z a-z 0-9 _ . -")
    if len(key) < MIN_KEY_LENGTH or not _KEY.match(key):
        raise ValueError(
            f"{where}: the key must be at least {MIN_KEY_LENGTH} printable characters"
            " without spaces (for example `openssl rand -hex 24`)"
        )
    if role not in ROLES:
        raise ValueError(f"{where}: the role must be one of {', '.join(ROLES)}, not {role!r}")
    return ApiKey(name, key, role)


def _no_duplicates(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            shown = value if what == "name" else "(hidden)"
            raise ValueError(f"two entries have the same {what} {shown}")
        seen.add(value)


def find_key(keys: Iterable[ApiKey], presented: str) -> ApiKey | None:
    """The key presented, compared in constant time against every configured one."""
    found = None
    for candidate in keys:
        if hmac.compare_digest(candidate.key.encode(), presented.encode()):
            found = candidate
    return found


def parse_origins(raw: object) -> tuple[str, ...]:
    """Comma-separated or a JSON list; each `scheme://host[:port]`, or `*`."""
    if raw is None or isinstance(raw, tuple | list):
        origins = [str(o) for o in raw or ()]
    elif isinstance(raw, str) and raw.strip().startswith("["):
        try:
            loaded = json.loads(raw)
        except ValueError:
            raise ValueError("is not a valid JSON list of origins") from None
        if not isinstance(loaded, list) or not all(isinstance(o, str) for o in loaded):
            raise ValueError("must be a JSON list of strings")
        origins = loaded
    elif isinstance(raw, str):
        origins = [o.strip() for o in raw.split(",") if o.strip()]
    else:
        raise ValueError("must be a comma-separated string or a JSON list")
    for origin in origins:
        if origin != "*" and not _ORIGIN.match(origin):
            raise ValueError(
                f"origin {origin!r} must be scheme://host[:port] (no path, no trailing slash)"
            )
    return tuple(origins)


def is_loopback(host: str) -> bool:
    """Only what surely stays on this machine: `localhost` and loopback addresses."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
