"""The adapter between componentize-py's generated bindings (``wit_world``) and
``setpoint_sdk``. Imported only inside a component build, by ``export``."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import clock, kv, log, objects

try:
    from wit_world.imports import types
except ImportError:  # the plugin-with-http world, where wasi:http has a `types` too
    from wit_world.imports import setpoint_reconciler_types as types

# Imported now, while the component is built: a component has no files to
# import from later.
try:
    from .wasi_http import send as _send_http
except ImportError:  # built without wasi:http
    _send_http = None

from .http import Unavailable
from . import (
    Action, Error, Fatal, Level, Object, Plugin, Retry, RetryAfter, call_reconcile,
    call_validate, encode_status, pairs,
)

_LEVELS = {
    Level.TRACE: log.Level.TRACE,
    Level.DEBUG: log.Level.DEBUG,
    Level.INFO: log.Level.INFO,
    Level.WARN: log.Level.WARN,
    Level.ERROR: log.Level.ERROR,
}


def _object(o: types.Object) -> Object:
    return Object(
        kind=o.kind, name=o.name, namespace=o.namespace, uid=o.uid, generation=o.generation,
        labels=dict(o.labels), spec=json.loads(o.spec) if o.spec else None,
        status=json.loads(o.status) if o.status else None,
        finalizers=list(o.finalizers), deleting=o.deleting,
    )


class WasmHost:
    """The real host: the component's imports."""

    def log(self, level: Level, message: str, **fields: str) -> None:
        log.log(_LEVELS[Level(level)], message, [(k, str(v)) for k, v in fields.items()])

    def get(self, kind: str, namespace: str, name: str) -> Optional[Object]:
        o = objects.get(kind, namespace, name)
        return None if o is None else _object(o)

    def list(self, kind: str, selector: Optional[Dict[str, str]] = None) -> List[Object]:
        return [_object(o) for o in objects.list(kind, pairs(selector or {}))]

    def set_status(self, kind: str, namespace: str, name: str, status: Any) -> None:
        try:
            objects.set_status(kind, namespace, name, encode_status(status) or "null")
        except Err as e:
            raise Retry(f"set-status of {kind}:{name} failed: {e.value}") from None

    def kv_get(self, key: str) -> Optional[bytes]:
        return kv.get(key)

    def kv_set(self, key: str, value: bytes) -> None:
        kv.set(key, bytes(value))

    def kv_delete(self, key: str) -> None:
        kv.delete(key)

    def kv_keys(self, prefix: str) -> List[str]:
        return kv.keys(prefix)

    def now_ms(self) -> int:
        return clock.now()

    def report_drift(self, detail: str) -> None:
        objects.report_drift(detail)

    def http(self, request):
        if _send_http is None:
            raise Unavailable()
        return _send_http(request)


def _reconcile_error(e: Error):
    if isinstance(e, RetryAfter):
        return types.ReconcileError_RetryAfter(types.RetryAfter(delay=e.delay_ms, message=e.message))
    if isinstance(e, Fatal):
        return types.ReconcileError_Fatal(e.message)
    return types.ReconcileError_Retry(e.message)


def reconciler_for(plugin_class: type):
    host = WasmHost()

    class Reconciler(exports.Reconciler):
        def __init__(self) -> None:
            self.plugin: Plugin = plugin_class()

        def describe(self) -> types.Info:
            info = self.plugin.describe()
            return types.Info(name=info.name, version=info.version, kinds=list(info.kinds),
                              resync_interval=info.resync_interval_ms)

        def reconcile(self, request: types.Request) -> types.Outcome:
            state = dict(request.state)
            action = Action(request.action.name.lower())
            try:
                obj = _object(request.object)
                outcome = call_reconcile(self.plugin, host, request.key, action, obj,
                                         request.attempt, state)
                status = encode_status(outcome.status)
            except Error as e:
                raise Err(types.Failure(error=_reconcile_error(e), state=pairs(e.state)))
            except Exception as e:  # e.g. a spec that is not JSON, a status that is not
                raise Err(types.Failure(error=types.ReconcileError_Fatal(
                    f"{type(e).__name__}: {e}"), state=pairs(state)))
            return types.Outcome(requeue_after=outcome.requeue_after_ms,
                                 state=pairs(outcome.state), status=status)

    return Reconciler


def pruner_for(plugin_class: type):
    host = WasmHost()

    class Pruner(exports.Pruner):
        def __init__(self) -> None:
            self.plugin: Plugin = plugin_class()

        def prune(self, desired_keys: List[str]) -> None:
            try:
                self.plugin.prune(host, list(desired_keys))
            except Error as e:
                raise Err(_reconcile_error(e))
            except Exception as e:
                raise Err(types.ReconcileError_Retry(f"{type(e).__name__}: {e}"))

    return Pruner


def admission_for(plugin_class: type):
    class Admission(exports.Admission):
        def __init__(self) -> None:
            self.plugin: Plugin = plugin_class()

        def validate(self, object: types.Object) -> None:
            try:
                obj = _object(object)
            except ValueError as e:  # json.JSONDecodeError
                raise Err(f"spec: not JSON: {e}")
            try:
                problem = call_validate(self.plugin, obj)
            except Exception as e:  # a stray exception would trap the instance
                problem = f"the plugin's validate raised {type(e).__name__}: {e}"
            if problem is not None:
                raise Err(problem)

    return Admission
