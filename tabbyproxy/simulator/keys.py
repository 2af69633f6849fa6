"""
TabbyAPI's API keys: ``api_tokens.yml`` read (or generated), and each request's key checked
for the routes that need an API or an admin key.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path
from typing import Callable

import yaml
from attrs import define

from twisted.web.server import Request

from tabbyproxy.simulator.config import readYaml
from tabbyproxy.simulator.console import Console


@define
class AuthKeys:
    """
    The keys from api_tokens.yml, checked with TabbyAPI's header rules (reference section 3).
    """

    apiKeys: list[str]
    adminKey: str
    disabled: bool = False

    @classmethod
    def load(cls, cwd: Path, disabled: bool, console: Console) -> AuthKeys:
        """
        Read api_tokens.yml, or generate and write it when missing, as TabbyAPI does at start.
        The key values are printed only when they were just generated, which is also the only
        time TabbyAPI's console is the sole place a person could learn them.
        """
        if disabled:
            console.warning(
                "Disabling authentication makes your instance vulnerable. Set the "
                "`disable_auth` flag to False in config.yml if you want to share this "
                "instance with others."
            )
            return cls(apiKeys=[], adminKey="", disabled=True)
        path = cwd / "api_tokens.yml"
        if path.exists():
            data = readYaml(path)
            raw = data.get("api_key") or []
            apiKeys = [str(k) for k in (raw if isinstance(raw, list) else [raw])]
            keys = cls(apiKeys=apiKeys, adminKey=str(data.get("admin_key") or ""))
            console.info("Your API and admin keys are in api_tokens.yml.")
            return keys
        keys = cls(apiKeys=[secrets.token_hex(16)], adminKey=secrets.token_hex(16))
        with path.open("w", encoding="utf8") as f:
            yaml.safe_dump({"api_key": keys.apiKeys[0], "admin_key": keys.adminKey}, f)
        console.info(f"Your API key is: {keys.apiKeys[0]}")
        console.info(f"Your admin key is: {keys.adminKey}")
        console.info(
            "If these keys get compromised, make sure to delete api_tokens.yml and "
            "restart the server. Have fun!"
        )
        return keys

    def isAdmin(self, key: str) -> bool:
        return bool(self.adminKey) and hmac.compare_digest(key.encode(), self.adminKey.encode())

    def isApi(self, key: str) -> bool:
        # Check every key rather than stopping early, so timing does not reveal which matched.
        found = False
        for candidate in self.apiKeys:
            found |= hmac.compare_digest(key.encode(), candidate.encode())
        return found or self.isAdmin(key)

    def checkApiKey(self, request: Request) -> str | None:
        """
        Return the 401 message for an API route, or None when the request may proceed.
        """
        return self._check(request, "x-api-key", self.isApi, "API")

    def checkAdminKey(self, request: Request) -> str | None:
        """
        Return the 401 message for an admin route, or None when the request may proceed.
        """
        return self._check(request, "x-admin-key", self.isAdmin, "admin")

    def _check(self, request: Request, header: str, valid: Callable[[str], bool], kind: str) -> str | None:
        """
        TabbyAPI's rule for both kinds of route: its own header first, else C{Authorization:
        Bearer}; a present but wrong key fails even when the other header would pass.
        """
        if self.disabled:
            return None
        key = request.getHeader(header)
        if key is None:
            authorization = request.getHeader("authorization")
            if authorization is None:
                return f"Please provide an {kind} key"
            key = _bearerToken(authorization)
        return None if key is not None and valid(key) else f"Invalid {kind} key"

    def permission(self, request: Request) -> str | None:
        """
        C{get_key_permission}: the first of x-admin-key, x-api-key, authorization decides;
        None means the key it found is not valid.
        """
        if self.disabled:
            return "admin"
        key = request.getHeader("x-admin-key")
        if key is None:
            key = request.getHeader("x-api-key")
        if key is None:
            authorization = request.getHeader("authorization")
            key = _bearerToken(authorization) if authorization is not None else None
        if key is None:
            return None
        if self.isAdmin(key):
            return "admin"
        if self.isApi(key):
            return "api"
        return None


def _bearerToken(authorization: str) -> str | None:
    parts = authorization.split(" ")
    if len(parts) < 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


