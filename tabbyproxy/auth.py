"""
Who may use the proxy: the keys of TabbyAPI's C{api_tokens.yml}, checked on every request when
TabbyAPI's auth is on.  API keys open the model routes; the admin key opens everything, including
the routes that stop models.  Keys are compared in constant time and never logged.

The file is followed as TabbyAPI follows it (L{KeyWatcher}): keys added or revoked while the proxy
runs take effect within L{KEY_FILE_INTERVAL} seconds, for clients and for the admin key the proxy
sends TabbyAPI; a file that is broken keeps the keys read last.
"""

from __future__ import annotations

import hmac
import os
from enum import IntEnum
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from tabbyproxy.config import ConfigError, Keys, readKeys

KEY_FILE_INTERVAL = 2.0
"""How often C{api_tokens.yml} is looked at, in seconds: as often as TabbyAPI looks."""

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


def _fileVersion(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    # The inode too: a file replaced by a rename may keep its size and even its mtime.
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class KeyWatcher(Service):
    """
    The keys of C{api_tokens.yml} as they are now: every L{KEY_FILE_INTERVAL} seconds (on the
    injected clock) the file's modification time, size and inode are compared with what was
    read, and a changed file is read again.  A file that is now missing or broken keeps the keys
    read last, and the log says why, once per change of the file.  Calling the watcher gives the
    current L{Keys}.
    """

    log = Logger()

    def __init__(self, path: Path, keys: Keys, clock: IReactorTime) -> None:
        self.path = path
        self.keys = keys
        self._version = _fileVersion(path)
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def __call__(self) -> Keys:
        return self.keys

    def startService(self) -> None:
        super().startService()
        self._loop.start(KEY_FILE_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        """
        Read the file again if it changed since it was last read.
        """
        version = _fileVersion(self.path)
        if version == self._version:
            return
        self._version = version
        if version is None:
            self.log.warn("{path} is gone; the proxy keeps the keys it read last", path=str(self.path))
            return
        try:
            apiKeys, adminKey = readKeys(self.path)
        except ConfigError as e:
            self.log.warn("{problem}; the proxy keeps the keys it read last", problem=str(e))
            return
        self.keys = Keys(enabled=True, apiKeys=apiKeys, adminKey=adminKey)
        self.log.info("Read the keys of {path} again: {count} API keys and the admin key",
                      path=str(self.path), count=len(apiKeys))
