"""Outgoing HTTP for Python plugins the operator grants it.

A plugin calls ``host.http(Request.get(url))`` and gets a :class:`Response`
(read whole) or one of the :class:`HttpError` exceptions. It is built against
the ``plugin-with-http`` world (``sdk/python/http-wit``: the plugin world plus
``wasi:http/outgoing-handler``), lists the hosts it calls in its manifest's
``[capabilities.http]``, and loads only where the operator grants them
(``[grants.NAME] http = { hosts = [...] }``).

The host sends only to granted hosts: anything else raises :class:`Denied`
(fatal: retrying cannot help until the grant or the object changes). A
request slower than the grant's timeout raises :class:`Timeout`, a body
larger than its limit :class:`TooLarge`; both, like a failed connection
(:class:`HttpError`), are retried with back-off.

In native tests, ``FakeHost.on_http(handler)`` answers the requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, List, Tuple

from . import Fatal, Retry


@dataclass
class Request:
    method: str
    url: str
    headers: List[Tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @staticmethod
    def get(url: str) -> "Request":
        return Request("GET", url)

    @staticmethod
    def put(url: str) -> "Request":
        return Request("PUT", url)

    @staticmethod
    def delete(url: str) -> "Request":
        return Request("DELETE", url)

    def json(self, value: Any) -> "Request":
        """A JSON body, with its content type."""
        self.headers.append(("content-type", "application/json"))
        self.body = json.dumps(value).encode()
        return self

    def parts(self) -> Tuple[str, str, str]:
        """(scheme, authority, path with query), or InvalidUrl."""
        scheme, sep, rest = self.url.partition("://")
        if not sep or scheme not in ("http", "https"):
            raise InvalidUrl(self.url)
        cut = min([i for i in (rest.find("/"), rest.find("?")) if i >= 0], default=len(rest))
        authority, path = rest[:cut], rest[cut:] or "/"
        if not authority:
            raise InvalidUrl(self.url)
        return scheme, authority, path


@dataclass
class Response:
    status: int
    headers: List[Tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def is_success(self) -> bool:
        return 200 <= self.status < 300

    def is_server_error(self) -> bool:
        return 500 <= self.status < 600

    def json(self) -> Any:
        return json.loads(self.body)


class HttpError(Retry):
    """The request got no response (connection, DNS, TLS ...): retried."""


class Timeout(HttpError):
    def __init__(self) -> None:
        super().__init__("the request timed out")


class TooLarge(HttpError):
    def __init__(self) -> None:
        super().__init__("the response body is larger than the host allows")


class Denied(Fatal):
    def __init__(self, url: str) -> None:
        super().__init__(
            f"the host denied the request to {url}: its host is not in this plugin's HTTP "
            "grant (list it in the manifest's [capabilities.http] hosts, and ask the "
            "operator to grant it)")


class InvalidUrl(Fatal):
    def __init__(self, url: str) -> None:
        super().__init__(f"`{url}` is not an http(s) URL with a host")


class Unavailable(Fatal):
    def __init__(self) -> None:
        super().__init__(
            "outgoing HTTP is not available: build the plugin against the plugin-with-http "
            "world (sdk/python/http-wit)")
