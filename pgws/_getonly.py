"""
A resource that only reads: GET and HEAD, and a one-line 405 for any other method (twisted.web's
own answer is an HTML page, built by a class it deprecates).
"""

from __future__ import annotations

from typing import Any

from twisted.web import resource, server

__all__ = ["GetOnlyResource"]


class GetOnlyResource(resource.Resource):
    """
    Subclasses define C{render_GET}.  HEAD gets GET's headers and length without the body
    (twisted.web would warn about a HEAD answer with a body).
    """

    isLeaf = True

    def render_GET(self, request: server.Request) -> Any:
        raise NotImplementedError

    def render(self, request: server.Request) -> Any:
        if request.method == b"GET":
            return self.render_GET(request)
        if request.method == b"HEAD":
            body = self.render_GET(request)
            if not isinstance(body, bytes):
                return body  # NOT_DONE_YET: twisted.web drops what a HEAD answer writes
            request.setHeader(b"content-length", str(len(body)).encode())
            return b""
        request.setResponseCode(405)
        request.setHeader(b"allow", b"GET, HEAD")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        method = request.method.decode("latin-1", "replace")[:16]
        return f"method {method} is not allowed here; use GET or HEAD\n".encode()
