"""setpoint_sdk: write a Setpoint reconciler in Python.

A plugin is a class with ``describe()`` and ``reconcile(host, request)``; the SDK
decodes the spec (into a dataclass if the class names one in ``Spec``), encodes
the status, turns exceptions into the WIT ``reconcile-error``, and hands back
the state the plugin returned last time. ``export(MyPlugin)`` makes the class
componentize-py builds; ``setpoint_sdk.testing.FakeHost`` runs the same plugin in
plain CPython, with no Wasm and no generated bindings::

    from dataclasses import dataclass
    from setpoint_sdk import Info, Outcome, Plugin, export

    @dataclass
    class Spec:
        who: str

    class Hello(Plugin):
        Spec = Spec

        def describe(self):
            return Info("hello-py", "0.1.0", ["Greeting"])

        def reconcile(self, host, req):
            return Outcome.done().with_status({"greeting": f"Hello, {req.spec.who}!"})

    Reconciler = export(Hello)   # the name componentize-py looks for

This module imports nothing generated: only ``export`` touches componentize-py's
bindings, and only when it is called inside a component build.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

__all__ = [
    "Action", "Error", "Fatal", "Host", "Info", "Level", "Object", "Outcome",
    "Plugin", "Request", "Retry", "RetryAfter", "export",
]


class Action(str, Enum):
    """Why a reconcile happens (the WIT ``action``)."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    RESYNCED = "resynced"


class Level(str, Enum):
    TRACE = "trace"
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


@dataclass
class Info:
    """What a plugin says about itself."""

    name: str
    version: str
    kinds: Sequence[str]
    resync_interval_ms: Optional[int] = None


@dataclass
class Object:
    """One object of desired state, as the host has it."""

    kind: str
    name: str
    namespace: str = ""
    uid: str = ""
    generation: int = 1
    labels: Dict[str, str] = field(default_factory=dict)
    spec: Any = None
    status: Any = None
    finalizers: List[str] = field(default_factory=list)
    deleting: bool = False

    @property
    def key(self) -> str:
        """``kind:namespace/name``, or ``kind:name`` in the default namespace."""
        middle = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}:{middle}{self.name}"


@dataclass
class Request:
    """One call of ``reconcile``. ``spec`` is the decoded spec."""

    key: str
    action: Action
    object: Object
    spec: Any
    attempt: int
    state: Dict[str, str]


@dataclass
class Outcome:
    """A successful reconcile: optionally a status, state and a requeue."""

    status: Any = None
    state: Dict[str, str] = field(default_factory=dict)
    requeue_after_ms: Optional[int] = None

    @staticmethod
    def done() -> "Outcome":
        return Outcome()

    def with_status(self, status: Any) -> "Outcome":
        self.status = status
        return self

    def with_state(self, key: str, value: str) -> "Outcome":
        self.state[key] = value
        return self

    def requeue_after(self, ms: int) -> "Outcome":
        self.requeue_after_ms = int(ms)
        return self


class Error(Exception):
    """A failed reconcile. Raise one of its subclasses; ``state`` comes back on
    the next attempt."""

    def __init__(self, message: str, state: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.message = message
        self.state = dict(state or {})


class Retry(Error):
    """A transient failure: the host retries with its back-off."""


class RetryAfter(Error):
    """A transient failure: the host retries after ``delay_ms``."""

    def __init__(self, delay_ms: int, message: str, state: Optional[Dict[str, str]] = None):
        super().__init__(message, state)
        self.delay_ms = int(delay_ms)


class Fatal(Error):
    """A permanent failure: no retry until the object changes."""


class Host(Protocol):
    """What the host offers a plugin (the WIT imports)."""

    def log(self, level: Level, message: str, **fields: str) -> None: ...
    def get(self, kind: str, namespace: str, name: str) -> Optional[Object]: ...
    def list(self, kind: str, selector: Optional[Dict[str, str]] = None) -> List[Object]: ...
    def set_status(self, kind: str, namespace: str, name: str, status: Any) -> None: ...
    def kv_get(self, key: str) -> Optional[bytes]: ...
    def kv_set(self, key: str, value: bytes) -> None: ...
    def kv_delete(self, key: str) -> None: ...
    def kv_keys(self, prefix: str) -> List[str]: ...
    def now_ms(self) -> int: ...
    def report_drift(self, detail: str) -> None: ...


class Plugin:
    """Subclass this. Set ``Spec`` to a dataclass to get the spec decoded into it
    (a spec that does not fit fails as ``Fatal``, with Python's message)."""

    Spec: Optional[type] = None

    def describe(self) -> Info:
        raise NotImplementedError

    def reconcile(self, host: Host, req: Request) -> Outcome:
        raise NotImplementedError

    def prune(self, host: Host, desired_keys: List[str]) -> None:
        """Remove what no desired key wants (full reconciliation). Optional."""


# The steps the host's side of a call takes, shared by the component adapter
# and the FakeHost, so a unit test exercises exactly what runs in Wasm.

def decode_spec(plugin: Plugin, obj: Object) -> Any:
    """The object's spec, as the plugin's ``Spec`` dataclass if it names one."""
    spec = obj.spec
    if plugin.Spec is None:
        return spec
    if not isinstance(spec, dict):
        raise Fatal(f"the spec of {obj.key} is not a mapping: {spec!r}")
    try:
        return plugin.Spec(**spec)
    except TypeError as e:
        raise Fatal(f"the spec of {obj.key} does not fit {plugin.Spec.__name__}: {e}") from None


def encode_status(status: Any) -> Optional[str]:
    """A status (dataclass, dict, list, ...) as the JSON text the host stores."""
    if status is None:
        return None
    if dataclasses.is_dataclass(status) and not isinstance(status, type):
        status = dataclasses.asdict(status)
    return json.dumps(status)


def call_reconcile(plugin: Plugin, host: Host, key: str, action: Action, obj: Object,
                   attempt: int, state: Dict[str, str]) -> Outcome:
    """Decode, call, and turn a stray exception into ``Retry`` (a bug in a plugin
    should not take its instance down: the traceback would be lost)."""
    try:
        spec = decode_spec(plugin, obj)
        return plugin.reconcile(host, Request(key, action, obj, spec, attempt, state))
    except Error:
        raise
    except Exception as e:  # noqa: BLE001 - reported to the host, not swallowed
        raise Retry(f"the plugin raised {type(e).__name__}: {e}", state) from e


def export(plugin_class: type):
    """The ``Reconciler`` class componentize-py exports for ``plugin_class``."""
    from .wasm import reconciler_for  # only inside a component build

    return reconciler_for(plugin_class)


def export_pruner(plugin_class: type):
    """The ``Pruner`` class for the ``plugin-with-prune`` world."""
    from .wasm import pruner_for

    return pruner_for(plugin_class)


def pairs(mapping: Dict[str, str]) -> List[Tuple[str, str]]:
    return [(str(k), str(v)) for k, v in mapping.items()]
