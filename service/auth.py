"""API keys: scopes, namespaces, hashed storage, constant-time checks.

A key is a random token shown once, when it is made::

    fov_3f9a0c1d_Yc2u...43 characters...    ("fov_" + 8 hex id + "_" + 32 random bytes, URL-safe base64)

The server keeps only its **hash** (SHA-256 of the whole token; a token carries 256 random bits, so
a slow password hash would add nothing but latency). A stored key is one line::

    <id>:<namespace>:<scopes>:<sha256 hex>[:<created, unix seconds>]
    3f9a0c1d:lab-a:ingest,read:9b71d224bd62f378...:1767225600

in the keys file (``FOVEATE_KEYS_FILE``, one per line, ``#`` comments; ``foveate keys create | revoke |
list`` edits it) or in ``FOVEATE_API_KEYS`` (lines separated by spaces, newlines or ``;``).

- **Scopes**: ``ingest`` (send fixations, reset and delete streams), ``read`` (list and inspect
  streams, predictions, the model), ``admin`` (everything, plus checkpoints and every namespace's
  streams). Admin implies the other two.
- **Namespace**: the lab or project a key belongs to. Stream ids are qualified by it (``lab-a:rig1``
  inside the worker), so a key sees, resets and deletes only its own namespace's streams; keys of one
  namespace share them, which is how a key is rotated without losing streams.

The token's id picks the stored key; the hashes are compared with :func:`hmac.compare_digest`.
The keys file is re-read when it changes (a revoked key stops working at its next request).

Examples
--------
>>> token, key = new_key("lab-a", {"ingest"})
>>> store = KeyStore.from_lines([key.line()])
>>> store.lookup(token).namespace
'lab-a'
>>> store.lookup(token + "x") is None
True
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from learner.errors import ConfigError

SCOPES = ("ingest", "read", "admin")
NAMESPACE_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
_NAMESPACE = re.compile(NAMESPACE_PATTERN)
_ID = re.compile(r"^[0-9a-f]{8}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_TOKEN = re.compile(r"^fov_([0-9a-f]{8})_[A-Za-z0-9_-]{20,128}$")


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a token (what the server stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_scopes(text: str | Iterable[str]) -> frozenset[str]:
    """``"ingest,read"`` (or an iterable) as a set of scopes; ``ConfigError`` for an unknown one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = frozenset(s.strip() for s in items if s.strip())
    unknown = scopes - set(SCOPES)
    if unknown or not scopes:
        raise ConfigError(f"scopes must be a comma-separated subset of {', '.join(SCOPES)}; got {text!r}")
    return scopes


def check_namespace(name: str) -> str:
    """Return ``name`` if it is a valid namespace (1-32 of ``A-Z a-z 0-9 _ -``), else ``ConfigError``."""
    if not _NAMESPACE.fullmatch(name):
        raise ConfigError(f"namespace {name[:40]!r} is invalid: use 1-32 characters from A-Z a-z 0-9 _ -")
    return name


@dataclass(frozen=True)
class ApiKey:
    """A stored key: its public id, namespace, scopes and the hash of its token."""

    id: str
    namespace: str
    scopes: frozenset[str]
    sha256: str = field(repr=False)
    created: int = 0

    def allows(self, scope: str) -> bool:
        """Whether the key may use a route that needs ``scope`` (admin may use every route)."""
        return scope in self.scopes or "admin" in self.scopes

    def line(self) -> str:
        """The key's line in a keys file or in ``FOVEATE_API_KEYS``."""
        scopes = ",".join(s for s in SCOPES if s in self.scopes)
        return f"{self.id}:{self.namespace}:{scopes}:{self.sha256}:{self.created}"

    @classmethod
    def parse(cls, line: str) -> ApiKey:
        """Parse a stored key line (``ConfigError`` saying what is wrong, never the hash)."""
        parts = line.strip().split(":")
        if len(parts) not in (4, 5):
            raise ConfigError(
                f"a stored key is id:namespace:scopes:sha256[:created]; got {len(parts)} fields in a line "
                f"starting {line.strip()[:14]!r}"
            )
        key_id, namespace, scopes, digest = parts[:4]
        if not _ID.fullmatch(key_id):
            raise ConfigError(f"key id {key_id[:20]!r} is not 8 lowercase hex digits")
        if not _SHA.fullmatch(digest):
            raise ConfigError(f"key {key_id}: the hash is not 64 lowercase hex digits (SHA-256)")
        created = parts[4] if len(parts) == 5 else "0"
        if not created.isdigit():
            raise ConfigError(f"key {key_id}: created must be unix seconds, got {created[:20]!r}")
        return cls(key_id, check_namespace(namespace), parse_scopes(scopes), digest, int(created))


def new_key(namespace: str, scopes: Iterable[str]) -> tuple[str, ApiKey]:
    """A fresh token and its stored form; the token is shown once and never stored."""
    key_id = secrets.token_hex(4)
    token = f"fov_{key_id}_{secrets.token_urlsafe(32)}"
    return token, ApiKey(key_id, check_namespace(namespace), parse_scopes(scopes), hash_token(token),
                         int(time.time()))  # fmt: skip


def _lines(text: str) -> list[str]:
    out: list[str] = []
    for raw in re.split(r"[\n;]", text):
        line = raw.split("#", 1)[0].strip()
        out.extend(part for part in line.split() if part)
    return out


class KeyStore:
    """The keys the server accepts: from ``FOVEATE_API_KEYS`` and/or a keys file, re-read when it changes.

    Parameters
    ----------
    lines
        Stored key lines (from the environment).
    path
        A keys file; it is re-read whenever its inode, size or modification time change, so that
        ``foveate keys revoke`` takes effect at the next request. A missing file holds no keys.
    """

    def __init__(self, lines: Iterable[str] = (), path: Path | None = None) -> None:
        self._static = {key.id: key for key in map(ApiKey.parse, lines)}
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._from_file: dict[str, ApiKey] = {}
        self._lock = threading.Lock()
        self._reload()

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> KeyStore:
        return cls(lines)

    @classmethod
    def from_settings(cls, api_keys: str | None, keys_file: Path | None) -> KeyStore | None:
        """The store the settings describe, or ``None`` when no key source is configured (open mode)."""
        if not (api_keys or "").strip() and keys_file is None:
            return None
        return cls(_lines(api_keys or ""), keys_file)

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._from_file = None, {}
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        with self._lock:
            keys = read_keys_file(self.path)
            self._from_file = {key.id: key for key in keys}
            self._stamp = stamp

    def keys(self) -> list[ApiKey]:
        self._reload()
        return [*self._static.values(), *self._from_file.values()]

    def __len__(self) -> int:
        return len(self.keys())

    def lookup(self, token: str) -> ApiKey | None:
        """The key whose token this is, or ``None``; the hash comparison takes constant time."""
        self._reload()
        match = _TOKEN.fullmatch(token)
        key = None
        if match is not None:
            key = self._from_file.get(match.group(1)) or self._static.get(match.group(1))
        # Compare against something even when the id is unknown, so that both cases cost the same.
        expected = key.sha256 if key is not None else "0" * 64
        ok = hmac.compare_digest(hash_token(token), expected)
        return key if ok and key is not None else None


# ---------------------------------------------------------------- the keys file


def read_keys_file(path: Path) -> list[ApiKey]:
    """Every key of a keys file (``ConfigError`` naming the line for a broken one)."""
    keys = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            keys.append(ApiKey.parse(line))
        except ConfigError as exc:
            raise ConfigError(f"{path}, line {number}: {exc}") from None
    return keys


def write_keys_file(path: Path, keys: Iterable[ApiKey]) -> None:
    """Write the keys file atomically (a temporary file renamed over it), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "# foveate API keys: id:namespace:scopes:sha256:created (hashes only; `foveate keys`)\n"
    body += "".join(key.line() + "\n" for key in keys)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
