"""Run a plugin in plain CPython against an in-memory host: no Wasm, no
generated bindings. ``FakeHost.reconcile`` takes the steps the real host takes
(spec decoding, state hand-back between attempts, storing a returned status; a
delete whose spec does not decode goes to the plugin's ``delete_invalid``), and
``FakeHost.validate`` runs admission as the component's ``admission.validate``
does."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from . import (
    Action, Error, Level, Object, Outcome, Plugin, call_reconcile, call_validate,
    encode_status,
)


class FakeHost:
    def __init__(self, now_ms: int = 0) -> None:
        self.objects: Dict[str, Object] = {}
        self.kv: Dict[str, bytes] = {}
        self.logs: List[Tuple[Level, str, Dict[str, str]]] = []
        self.drift: List[str] = []
        self.clock = now_ms
        self._states: Dict[str, Tuple[int, Dict[str, str]]] = {}
        self._http = None
        self.sent: List[Any] = []

    # What a test does.

    def on_http(self, handler) -> None:
        """Answer the plugin's ``host.http(request)`` with ``handler(request)``
        (a ``setpoint_sdk.http.Response``, or raise one of its errors)."""
        self._http = handler

    def put(self, obj: Object) -> Object:
        self.objects[obj.key] = obj
        return obj

    def reconcile(self, plugin: Plugin, action: Action, obj: Object) -> Outcome:
        """Reconcile ``obj`` as the host would; raises the plugin's ``Error``."""
        if action == Action.DELETED:
            obj.deleting = True
        old = self.objects.get(obj.key)
        if old is not None and obj.status is None:
            obj.status = old.status
        self.put(obj)
        attempt, state = self._states.get(obj.key, (0, {}))
        try:
            outcome = call_reconcile(plugin, self, obj.key, action, obj, attempt, dict(state))
        except Error as e:
            self._states[obj.key] = (attempt + 1, e.state)
            raise
        self._states[obj.key] = (0, dict(outcome.state))
        text = encode_status(outcome.status)
        if text is not None:
            obj.status = json.loads(text)
        return outcome

    def validate(self, plugin: Plugin, obj: Object) -> Optional[str]:
        """Admission, as the host asks before storing ``obj``: ``None`` admits it,
        a message naming the field refuses it. Stores nothing."""
        return call_validate(plugin, obj)

    # The Host protocol.

    def log(self, level: Level, message: str, **fields: str) -> None:
        self.logs.append((Level(level), message, {k: str(v) for k, v in fields.items()}))

    def get(self, kind: str, namespace: str, name: str) -> Optional[Object]:
        return self.objects.get(Object(kind, name, namespace).key)

    def list(self, kind: str, selector: Optional[Dict[str, str]] = None) -> List[Object]:
        selector = selector or {}
        return [o for _, o in sorted(self.objects.items())
                if o.kind == kind and all(o.labels.get(k) == v for k, v in selector.items())]

    def set_status(self, kind: str, namespace: str, name: str, status: Any) -> None:
        obj = self.get(kind, namespace, name)
        if obj is None:
            raise Error(f"object {kind}:{name} not found")
        obj.status = json.loads(encode_status(status) or "null")

    def kv_get(self, key: str) -> Optional[bytes]:
        return self.kv.get(key)

    def kv_set(self, key: str, value: bytes) -> None:
        self.kv[key] = bytes(value)

    def kv_delete(self, key: str) -> None:
        self.kv.pop(key, None)

    def kv_keys(self, prefix: str) -> List[str]:
        return sorted(k for k in self.kv if k.startswith(prefix))

    def now_ms(self) -> int:
        return self.clock

    def report_drift(self, detail: str) -> None:
        self.drift.append(detail)

    def http(self, request):
        self.sent.append(request)
        if self._http is None:
            from .http import Unavailable
            raise Unavailable()
        return self._http(request)
