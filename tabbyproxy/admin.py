"""
The proxy's own routes: C{/status} (what runs and why), C{/unload} (stop the model now),
C{/health} (the proxy itself answers), and C{/}, which answers as Ollama's root does so Ollama
clients find the server.
"""

from __future__ import annotations

from typing import Any

from attrs import define
from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from tabbyproxy.auth import Permission
from tabbyproxy.web import ClientError, ProxyState, writeJSON


@define
class AdminRoutes:
    """
    The routes outside C{/v1} and C{/api}.  Errors are C{{"error": "..."}}.
    """

    app = Klein()

    state: ProxyState

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Ollama is running"

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        return writeJSON(request, 200, {"status": "ok"})

    @app.route("/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        document: dict[str, Any] = self.state.supervisor.status()
        document["models"] = sorted(profile.id for profile in self.state.catalog())
        return writeJSON(request, 200, document)

    @app.route("/unload", methods=["GET", "POST"])
    async def unload(self, request: IRequest) -> bytes:
        try:
            self.state.requireKey(request, Permission.ADMIN)
        except ClientError as e:
            return writeJSON(request, e.status, {"error": e.message})
        running = self.state.supervisor.current
        if running is None:
            return writeJSON(request, 200, {"status": "success", "unloaded": None})
        await self.state.supervisor.unload()
        return writeJSON(request, 200, {"status": "success", "unloaded": running.profile.id})

    @app.handle_errors(NotFound)
    def notFound(self, request: IRequest, failure: Failure) -> bytes:
        return writeJSON(request, 404, {"error": f"no route {request.path.decode('utf-8', 'replace')}"})

    @app.handle_errors(MethodNotAllowed)
    def wrongMethod(self, request: IRequest, failure: Failure) -> bytes:
        return writeJSON(request, 405, {"error": f"{request.method.decode('ascii', 'replace')} is not allowed here"})
