"""Registry credentials, read as every container tool reads them.

``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``) ``auths`` entries
(``auth`` = base64 ``user:password``, or ``username``/``password``, or ``identitytoken``),
and the ``credHelpers``/``credsStore`` programs (``docker-credential-<name> get``). The
registry client (``_registry.py``) uses them to answer authentication challenges.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import AuthError, InvalidError

__all__ = ["Credentials", "docker_config_dir", "load_credentials"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Credentials:
    """Credentials for one registry.

    Attributes:
        username: User name (``""`` with an identity token only).
        password: Password or personal access token.
        identity_token: An OAuth2 refresh token (``docker login`` with an identity
            provider stores one as ``identitytoken``).
        source: Where they came from (for error messages; never the secret).
    """

    username: str = ""
    password: str = ""
    identity_token: str = ""
    source: str = "given"

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, source={self.source!r})"


def docker_config_dir(config_dir: str | os.PathLike[str] | None) -> Path:
    if config_dir is not None:
        return Path(config_dir)
    env = os.environ.get("DOCKER_CONFIG")
    if env:
        return Path(env)
    return Path.home() / ".docker"


def _host_keys(key: str) -> str:
    """``https://host:port/v1/`` -> ``host:port`` (config.json keys come in both forms)."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key.split("/", 1)[0]


def load_credentials(
    host: str, *, config_dir: str | os.PathLike[str] | None = None
) -> Credentials | None:
    """Credentials for ``host`` from Docker's client configuration, or ``None``.

    Looks in ``<config_dir>/config.json`` (default ``$DOCKER_CONFIG``, else
    ``~/.docker``): a ``credHelpers[host]`` program, else an ``auths`` entry, else the
    ``credsStore`` program. A helper is ``docker-credential-<name>`` on ``PATH``, asked with
    ``get`` and the host on stdin.

    Raises:
        InvalidError: ``config.json`` exists but is not valid JSON, or an ``auth`` value
            is not base64 ``user:password`` (naming the file and the host).
    """
    path = docker_config_dir(config_dir) / "config.json"
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        msg = f"cannot read Docker credentials {path}: {exc}"
        raise InvalidError(msg) from exc
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        msg = f"Docker credentials {path} are not valid JSON: {exc}"
        raise InvalidError(msg) from exc
    if not isinstance(doc, dict):
        return None
    helpers = doc.get("credHelpers") or {}
    if isinstance(helpers, dict) and isinstance(helpers.get(host), str):
        return _from_helper(helpers[host], host)
    auths = doc.get("auths") or {}
    if isinstance(auths, dict):
        for key, entry in auths.items():
            if isinstance(key, str) and _host_keys(key) == host and isinstance(entry, dict):
                found = _from_auth_entry(entry, host, path)
                if found is not None:
                    return found
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, host)
    return None


def _from_auth_entry(entry: Mapping[str, Any], host: str, path: Path) -> Credentials | None:
    source = f"{path} auths[{host!r}]"
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        user = entry.get("username")
        return Credentials(user if isinstance(user, str) else "", "", token, source)
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            msg = f"{source}: 'auth' is not base64 of user:password"
            raise InvalidError(msg) from exc
        user, sep, password = decoded.partition(":")
        if not sep:
            msg = f"{source}: 'auth' does not decode to user:password"
            raise InvalidError(msg)
        return Credentials(user, password, "", source)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return Credentials(name, secret, "", source)
    return None


def _from_helper(name: str, host: str) -> Credentials | None:
    program = shutil.which(f"docker-credential-{name}")
    if program is None:
        logger.warning("credential helper docker-credential-%s not found on PATH", name)
        return None
    try:
        done = subprocess.run(
            [program, "get"], input=host, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        msg = f"credential helper docker-credential-{name} failed for {host}: {exc}"
        raise AuthError(msg) from exc
    if done.returncode != 0:
        return None  # "credentials not found in native keychain"
    try:
        doc = json.loads(done.stdout)
        user, secret = doc["Username"], doc["Secret"]
    except (ValueError, KeyError, TypeError) as exc:
        msg = f"credential helper docker-credential-{name} gave no credentials for {host}"
        raise AuthError(msg) from exc
    source = f"docker-credential-{name}"
    if user == "<token>":
        return Credentials("", "", str(secret), source)
    return Credentials(str(user), str(secret), "", source)
