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

    # The classes componentize-py looks for (world plugin-with-admission).
    Reconciler, Pruner, Admission = export_all(Hello)

A spec that does not decode into ``Spec`` is handled the way the host needs:

- **Admission.** Before the host stores an object of one of the plugin's kinds,
  the component's ``admission.validate`` decodes its spec into ``Spec`` and
  refuses it naming the field (``spec.who: expected str, got int 5``,
  ``spec: missing field 'who'``), then calls the plugin's optional
  ``validate(obj, spec)`` for rules the types cannot express.
- **Reconcile.** A create, update or resync with such a spec fails as ``Fatal``
  (``the spec of Greeting:x is invalid: spec.who: ...``); the plugin is not called.
- **Delete.** A delete (``Action.DELETED`` or ``object.deleting``) always reaches
  the plugin so it can clean up and the host can release the object: with such a
  spec it goes to ``delete_invalid(host, req, error)`` with the raw spec in
  ``req.spec``. The default logs a warning and succeeds.

This module imports nothing generated: only the ``export*`` functions touch
componentize-py's bindings, and only when they are called inside a component
build.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

__all__ = [
    "Action", "Error", "Fatal", "Host", "Info", "Level", "Object", "Outcome",
    "Plugin", "Request", "Retry", "RetryAfter", "SpecError", "export", "export_all",
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
    """One call of ``reconcile``. ``spec`` is the decoded spec (in
    ``Plugin.delete_invalid``, the raw JSON spec that did not decode)."""

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
    def http(self, request: Any) -> Any: ...


class Plugin:
    """Subclass this. Set ``Spec`` to a dataclass to get the spec decoded into it,
    field types checked (``str``, ``int``, ``float``, ``bool``, ``Optional``,
    unions, ``List``/``Dict`` of those, nested dataclasses, enums). A spec that
    does not fit fails a create, update or resync as ``Fatal`` and is refused by
    admission, with a message naming the field; a delete with one goes to
    ``delete_invalid``."""

    Spec: Optional[type] = None

    def describe(self) -> Info:
        raise NotImplementedError

    def reconcile(self, host: Host, req: Request) -> Outcome:
        raise NotImplementedError

    def delete_invalid(self, host: Host, req: Request, error: str) -> Outcome:
        """Clean up after a deleted object whose spec does not decode into
        ``Spec``. Such a delete cannot reach ``reconcile``, and must not fail for
        good either: the host keeps the object (and its finalizer) until a delete
        succeeds. ``req.spec`` is the raw JSON spec; ``error`` says why it did not
        decode, naming the field (``spec.who: expected str, got int 5``).

        The default logs a warning and succeeds, so the host removes the object.
        Override it if the plugin made something for this object that it can find
        without the typed spec (by ``req.key``, ``req.object.uid``, the raw spec or
        ``req.state``); raise ``Retry`` to keep the object and try again."""
        host.log(Level.WARN, "deleted with a spec that does not decode: nothing to clean up",
                 key=req.key, error=error)
        return Outcome.done()

    def validate(self, obj: Object, spec: Any) -> Optional[str]:
        """Admission: rules for a spec that decoded into ``Spec`` that its types
        cannot express. The host asks before it stores an object of one of this
        plugin's kinds (create, update, apply; never delete). Return ``None`` to
        admit, or a message naming the field to refuse the write
        (``"spec.port: must be below 65536"``). Must not act on the world: it gets
        no host. The default admits every spec that decodes."""
        return None

    def prune(self, host: Host, desired_keys: List[str]) -> None:
        """Remove what no desired key wants (full reconciliation). Optional."""


# The steps the host's side of a call takes, shared by the component adapter
# and the FakeHost, so a unit test exercises exactly what runs in Wasm.

class SpecError(ValueError):
    """A spec that does not decode; the message names the field
    (``spec.who: expected str, got int 5``)."""


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def decode_value(tp: Any, value: Any, path: str = "spec") -> Any:
    """``value`` (decoded JSON) as type ``tp``; raises ``SpecError`` naming the
    field at ``path`` when it does not fit. Types it does not know are taken as
    they come."""
    if tp is Any or tp is object:
        return value
    if tp is None or tp is type(None):
        if value is None:
            return None
        raise SpecError(f"{path}: expected None, got {_shown(value)}")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return decode_value(args[0], value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return decode_value(arg, value, path)
            except SpecError:
                continue
        raise SpecError(f"{path}: expected {_type_name(tp)}, got {_shown(value)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise SpecError(f"{path}: expected {_type_name(tp)}, got {_shown(value)}")
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, list):
            raise SpecError(f"{path}: expected a list, got {_shown(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise SpecError(f"{path}: expected a list of {len(args)}, got {len(value)} items")
            return tuple(decode_value(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [decode_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{path}: expected a mapping, got {_shown(value)}")
        item = args[1] if len(args) == 2 else Any
        return {k: decode_value(item, v, f"{path}.{k}") for k, v in value.items()}
    if origin is not None:
        return value  # another generic: not checked
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _decode_dataclass(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise SpecError(f"{path}: expected one of {allowed}, got {_shown(value)}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value  # a type the SDK does not check
    raise SpecError(f"{path}: expected {tp.__name__}, got {_shown(value)}")


def _decode_dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise SpecError(f"{path}: expected a mapping ({cls.__name__}), got {_shown(value)}")
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # noqa: BLE001 - annotations that do not resolve: not checked
        hints = {}
    fields = [f for f in dataclasses.fields(cls) if f.init]
    known = {f.name for f in fields}
    unknown = [k for k in value if k not in known]
    if unknown:
        raise SpecError(f"{path}: unknown field {unknown[0]!r}")
    kwargs = {}
    for f in fields:
        if f.name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{path}: missing field {f.name!r}")
            continue
        kwargs[f.name] = decode_value(hints.get(f.name, Any), value[f.name], f"{path}.{f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # e.g. a __post_init__ check
        raise SpecError(f"{path}: {e}") from None


def _decode_spec(plugin: Plugin, spec: Any) -> Any:
    """The spec as the plugin's ``Spec``; raises ``SpecError`` naming the field."""
    if plugin.Spec is None:
        return spec
    if dataclasses.is_dataclass(plugin.Spec):
        # No spec at all: name the fields it misses.
        return decode_value(plugin.Spec, {} if spec is None else spec)
    if not isinstance(spec, dict):
        raise SpecError(f"spec: expected a mapping, got {_shown(spec)}")
    try:
        return plugin.Spec(**spec)
    except TypeError as e:
        raise SpecError(f"spec: does not fit {plugin.Spec.__name__}: {e}") from None


def decode_spec(plugin: Plugin, obj: Object) -> Any:
    """The object's spec, as the plugin's ``Spec`` if it names one; a spec that
    does not fit raises ``Fatal`` naming the field."""
    try:
        return _decode_spec(plugin, obj.spec)
    except SpecError as e:
        raise Fatal(f"the spec of {obj.key} is invalid: {e}") from None


def call_validate(plugin: Plugin, obj: Object) -> Optional[str]:
    """Admission, as the component's ``admission.validate`` runs it: ``None``
    admits ``obj``; a message (naming the field) refuses it. Decodes the spec into
    ``Spec``, then calls the plugin's ``validate``."""
    try:
        spec = _decode_spec(plugin, obj.spec)
    except SpecError as e:
        return str(e)
    problem = plugin.validate(obj, spec)
    return None if problem is None else str(problem)


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
    should not take its instance down: the traceback would be lost). A spec that
    does not decode is ``Fatal``, except on a delete, which goes to
    ``delete_invalid`` with the raw spec."""
    try:
        try:
            spec = _decode_spec(plugin, obj.spec)
        except SpecError as e:
            if action == Action.DELETED or obj.deleting:
                return plugin.delete_invalid(
                    host, Request(key, action, obj, obj.spec, attempt, state), str(e))
            raise Fatal(f"the spec of {key} is invalid: {e}", state) from None
        return plugin.reconcile(host, Request(key, action, obj, spec, attempt, state))
    except Error:
        raise
    except Exception as e:  # noqa: BLE001 - reported to the host, not swallowed
        raise Retry(f"the plugin raised {type(e).__name__}: {e}", state) from e


def export_all(plugin_class: type):
    """``(Reconciler, Pruner, Admission)``: the classes componentize-py exports
    for ``plugin_class`` in the world the SDK builds, ``plugin-with-admission``.
    Bind all three at the top of ``app.py``::

        Reconciler, Pruner, Admission = export_all(MyPlugin)

    Raises ``ImportError`` outside a component build (plain CPython)."""
    return export(plugin_class), export_pruner(plugin_class), export_admission(plugin_class)


def export(plugin_class: type):
    """The ``Reconciler`` class componentize-py exports for ``plugin_class``
    (alone, enough for the bare ``plugin`` world; see ``export_all``)."""
    from .wasm import reconciler_for  # only inside a component build

    return reconciler_for(plugin_class)


def export_pruner(plugin_class: type):
    """The ``Pruner`` class for the ``plugin-with-prune`` world."""
    from .wasm import pruner_for

    return pruner_for(plugin_class)


def export_admission(plugin_class: type):
    """The ``Admission`` class for the ``plugin-with-admission`` world."""
    from .wasm import admission_for

    return admission_for(plugin_class)


def pairs(mapping: Dict[str, str]) -> List[Tuple[str, str]]:
    return [(str(k), str(v)) for k, v in mapping.items()]
