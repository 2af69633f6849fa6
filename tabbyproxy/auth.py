"""
Who may use the proxy: the keys of TabbyAPI's C{api_tokens.yml}, checked on every request when
TabbyAPI's auth is on.  API keys open the model routes; the admin key opens everything, including
the routes that stop models.  Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from enum import IntEnum

from twisted.web.iweb import IRequest

from tabbyproxy.config import Keys

_KEY_HEADERS = (b"x-admin-key", b"x-api-key")


class Permission(IntEnum):
    NONE = 0
    API = 1
    ADMIN = 2


def presentedKey(request: IRequest) -> bytes | None:
    """
    The key a client sent: C{x-admin-key}, C{x-api-key}, or C{Authorization: Bearer}.
    """
    for name in _KEY_HEADERS:
        value = request.getHeader(name)
        if value:
            return bytes(value).strip()
    authorization = request.getHeader(b"authorization")
    if authorization:
        scheme, _, token = bytes(authorization).strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    return None


def _matches(presented: bytes, key: str) -> bool:
    return hmac.compare_digest(presented, key.encode("utf-8"))


def permissionOf(request: IRequest, keys: Keys) -> Permission:
    """
    What the request's key allows; everything when auth is off.
    """
    if not keys.enabled:
        return Permission.ADMIN
    presented = presentedKey(request)
    if presented is None:
        return Permission.NONE
    # Every key is compared, whatever matched first, so timing says nothing about which one did.
    isAdmin = _matches(presented, keys.adminKey)
    isAPI = False
    for apiKey in keys.apiKeys:
        isAPI |= _matches(presented, apiKey)
    if isAdmin:
        return Permission.ADMIN
    return Permission.API if isAPI else Permission.NONE


def authProblem(request: IRequest, keys: Keys, needed: Permission) -> str | None:
    """
    Why the request may not go on, or C{None} when it may.
    """
    granted = permissionOf(request, keys)
    if granted >= needed:
        return None
    if presentedKey(request) is None:
        kind = "an admin key" if needed is Permission.ADMIN else "an API key"
        return f"please provide {kind} (Authorization: Bearer KEY, or x-api-key: KEY)"
    if needed is Permission.ADMIN and granted is Permission.API:
        return "this route needs the admin key"
    return "invalid API key"
