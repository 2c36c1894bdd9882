"""records-py: the `records` plugin in Python, showing outgoing HTTP from a
Python component. It keeps one JSON document per `Record` object at
`{endpoint}/{namespace or _}/{name}`: GET, then PUT when missing or different
(reporting drift), DELETE when the object goes. A 5xx is retried, a 4xx is
fatal, as plugins/records does in Rust.

Built against the `plugin-with-http` world (this folder's `wit-world` file),
so it imports wasi:http/outgoing-handler and needs an HTTP grant.
"""

from dataclasses import dataclass
from typing import Any

from setpoint_sdk import Action, Fatal, Info, Outcome, Plugin, Retry, export_all
from setpoint_sdk.http import Request


@dataclass
class Spec:
    endpoint: str
    data: Any


def document_url(endpoint: str, obj) -> str:
    return f"{endpoint.rstrip('/')}/{obj.namespace or '_'}/{obj.name}"


def expect(what: str, response, *also: int) -> None:
    if response.is_success() or response.status in also:
        return
    message = f"{what}: the server answered {response.status}"
    raise Retry(message) if response.is_server_error() else Fatal(message)


class Records(Plugin):
    Spec = Spec

    def describe(self) -> Info:
        return Info("records-py", "0.1.0", ["Record"])

    def reconcile(self, host, req) -> Outcome:
        url = document_url(req.spec.endpoint, req.object)
        if req.action == Action.DELETED or req.object.deleting:
            expect(f"DELETE {url}", host.http(Request.delete(url)), 404)
            return Outcome.done()
        current = host.http(Request.get(url))
        expect(f"GET {url}", current, 404)
        if current.status == 404:
            remote = "created"
        elif current.json() == req.spec.data:
            return Outcome.done().with_status({"url": url, "remote": "in-sync"})
        else:
            host.report_drift(f"{url} holds {current.body[:80]!r}, not the spec's data")
            remote = "replaced"
        expect(f"PUT {url}", host.http(Request.put(url).json(req.spec.data)))
        return Outcome.done().with_status({"url": url, "remote": remote})


# Inside a component build only: natively (unit tests) there are no bindings.
try:
    Reconciler, Pruner, Admission = export_all(Records)
except ImportError:
    pass
