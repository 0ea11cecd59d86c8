"""Route table: exact paths first, then patterns with {name} segments; 404 / 405 with Allow."""
from __future__ import annotations

import re
from urllib.parse import unquote

from tidegate.core.http.http11 import HttpError, Request


class Router:
    """The HTTP route table. A handler takes the request alone; a pattern route's parameters
    are in req.params (%-decoded), so handlers and the wrappers around them (the guard) share
    one signature."""

    def __init__(self):
        self.exact: dict[str, dict[str, object]] = {}
        self.patterns: list[tuple[re.Pattern, str, dict[str, object]]] = []

    def add(self, method: str, path: str, handler) -> None:
        if "{" in path:
            regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
            for rx, p, methods in self.patterns:
                if p == path:
                    methods[method] = handler
                    return
            self.patterns.append((regex, path, {method: handler}))
        else:
            self.exact.setdefault(path, {})[method] = handler

    def dispatch(self, req: Request):
        """Find the handler and call it; it returns a Response or an awaitable of one."""
        methods = self.exact.get(req.path)
        if methods is None:
            for regex, pattern, candidate in self.patterns:
                m = regex.match(req.path)
                if m:
                    methods, req.route = candidate, pattern
                    req.params = {k: unquote(v) for k, v in m.groupdict().items()}
                    break
            else:
                raise HttpError(404, f"no route for {req.method} {req.path}", "not_found")
        else:
            req.route = req.path
        handler = methods.get(req.method)
        if handler is None and req.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allow = ", ".join(sorted(set(methods) | ({"HEAD"} if "GET" in methods else set())))
            raise HttpError(405, f"method {req.method} not allowed on {req.route}; allowed: {allow}",
                            "method_not_allowed", headers=[(b"allow", allow.encode())])
        return handler(req)
