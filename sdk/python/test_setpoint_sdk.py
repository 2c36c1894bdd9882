"""The SDK's own steps, in plain CPython against its FakeHost (no Wasm):
cd sdk/python && python3 -m unittest -v"""

import unittest
from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional, Union

from setpoint_sdk import (
    Action, Fatal, Level, Object, Outcome, Plugin, SpecError, decode_value,
)
from setpoint_sdk.testing import FakeHost


@dataclass
class Spec:
    who: str
    times: int = 1


class Plain(Plugin):
    """Only what a plugin must write: the defaults for deletes and admission."""

    Spec = Spec

    def reconcile(self, host, req):
        return Outcome.done().with_status({"greeting": f"Hello, {req.spec.who}!"})


class Careful(Plugin):
    """Records the deletes it gets with a spec that does not decode, and has an
    admission rule of its own."""

    Spec = Spec

    def __init__(self):
        self.deletes = []
        self.validated = []

    def reconcile(self, host, req):
        return Outcome.done().with_state("made", req.key)

    def delete_invalid(self, host, req, error):
        self.deletes.append((req.action, req.spec, error, dict(req.state)))
        return Outcome.done()

    def validate(self, obj, spec):
        self.validated.append(spec)
        if spec.times > 3:
            return "spec.times: at most 3"
        return None


class DeleteTest(unittest.TestCase):
    def test_a_create_with_a_bad_spec_is_fatal_and_names_the_field(self):
        host = FakeHost()
        with self.assertRaises(Fatal) as err:
            host.reconcile(Plain(), Action.CREATED, Object("Greeting", "x", spec={"who": 5}))
        self.assertEqual(err.exception.message,
                         "the spec of Greeting:x is invalid: spec.who: expected str, got int 5")
        for action in (Action.UPDATED, Action.RESYNCED):
            with self.assertRaises(Fatal):
                host.reconcile(Plain(), action, Object("Greeting", "x", spec={}))

    def test_a_delete_with_a_bad_spec_succeeds_by_default(self):
        host = FakeHost()
        outcome = host.reconcile(Plain(), Action.DELETED, Object("Greeting", "x", spec={"who": 5}))
        self.assertEqual(outcome, Outcome.done())
        level, _, fields = host.logs[-1]
        self.assertEqual(level, Level.WARN)
        self.assertEqual(fields, {"key": "Greeting:x", "error": "spec.who: expected str, got int 5"})
        # A retried delete (deleting, another action) goes the same way.
        host.reconcile(Plain(), Action.RESYNCED,
                       Object("Greeting", "y", spec=None, deleting=True))

    def test_a_delete_with_a_bad_spec_reaches_the_plugin_with_the_raw_spec_and_state(self):
        host, plugin = FakeHost(), Careful()
        host.reconcile(plugin, Action.CREATED, Object("Greeting", "x", spec={"who": "w"}))
        host.reconcile(plugin, Action.DELETED, Object("Greeting", "x", spec={"who": ["w"]}))
        self.assertEqual(plugin.deletes, [(
            Action.DELETED, {"who": ["w"]}, "spec.who: expected str, got list ['w']",
            {"made": "Greeting:x"})])
        self.assertTrue(host.get("Greeting", "", "x").deleting)


class AdmissionTest(unittest.TestCase):
    def test_validate_admits_a_good_spec(self):
        self.assertIsNone(FakeHost().validate(Plain(), Object("Greeting", "a", spec={"who": "w"})))

    def test_validate_refuses_a_bad_spec_naming_the_field(self):
        host = FakeHost()
        cases = [
            ({"who": 5}, "spec.who: expected str, got int 5"),
            ({}, "spec: missing field 'who'"),
            ({"who": "w", "whom": "x"}, "spec: unknown field 'whom'"),
            ({"who": "w", "times": True}, "spec.times: expected int, got bool True"),
            ("text", "spec: expected a mapping (Spec), got str 'text'"),
            (None, "spec: missing field 'who'"),
        ]
        for spec, message in cases:
            with self.subTest(spec=spec):
                self.assertEqual(host.validate(Plain(), Object("Greeting", "a", spec=spec)), message)
        self.assertEqual(host.objects, {})  # admission stores nothing

    def test_validate_calls_the_plugins_hook_after_decoding(self):
        plugin = Careful()
        host = FakeHost()
        self.assertIsNone(host.validate(plugin, Object("Greeting", "a", spec={"who": "w", "times": 2})))
        self.assertEqual(host.validate(plugin, Object("Greeting", "a", spec={"who": "w", "times": 9})),
                         "spec.times: at most 3")
        self.assertEqual(plugin.validated, [Spec("w", 2), Spec("w", 9)])
        # A spec that does not decode never reaches the hook.
        self.assertEqual(host.validate(plugin, Object("Greeting", "a", spec={"who": 1})),
                         "spec.who: expected str, got int 1")
        self.assertEqual(len(plugin.validated), 2)


class Color(str, Enum):
    RED = "red"


@dataclass
class Port:
    number: int
    name: Optional[str] = None


@dataclass
class Nested:
    ports: List[Port]
    labels: Dict[str, str] = field(default_factory=dict)
    color: Optional[Color] = None
    ratio: Union[int, str] = 0
    weight: float = 1.0


class DecodeTest(unittest.TestCase):
    def test_nested_types_decode_and_name_the_field(self):
        ok = decode_value(Nested, {"ports": [{"number": 80}], "labels": {"a": "b"},
                                   "color": "red", "ratio": "1:2", "weight": 2})
        self.assertEqual(ok, Nested([Port(80)], {"a": "b"}, Color.RED, "1:2", 2.0))
        cases = [
            ({"ports": [{"number": 80}, {"number": "x"}]},
             "spec.ports[1].number: expected int, got str 'x'"),
            ({"ports": {}}, "spec.ports: expected a list, got dict {}"),
            ({"ports": [], "labels": {"a": 1}}, "spec.labels.a: expected str, got int 1"),
            ({"ports": [], "color": "blue"}, "spec.color: expected Color or None, got str 'blue'"),
            ({"ports": [], "ratio": 1.5}, "spec.ratio: expected int or str, got float 1.5"),
            ({"ports": [{"name": "x"}]}, "spec.ports[0]: missing field 'number'"),
        ]
        for spec, message in cases:
            with self.subTest(spec=spec):
                with self.assertRaises(SpecError) as err:
                    decode_value(Nested, spec)
                self.assertEqual(str(err.exception), message)


class HttpTest(unittest.TestCase):
    def test_urls_split_and_bad_ones_are_fatal(self):
        from setpoint_sdk.http import InvalidUrl, Request
        self.assertEqual(Request.get("http://127.0.0.1:8080/r/a?x=1").parts(),
                         ("http", "127.0.0.1:8080", "/r/a?x=1"))
        self.assertEqual(Request.get("https://api.example.com").parts(),
                         ("https", "api.example.com", "/"))
        for bad in ("ftp://x/y", "api.example.com/x", "http:///x"):
            with self.assertRaises(InvalidUrl):
                Request.get(bad).parts()

    def test_a_fake_host_answers_http_and_without_a_handler_it_is_unavailable(self):
        from setpoint_sdk.http import Request, Response, Unavailable
        host = FakeHost()
        with self.assertRaises(Unavailable):
            host.http(Request.get("http://api/x"))
        host.on_http(lambda r: Response(201, body=r.body))
        answer = host.http(Request.put("http://api/x").json({"v": 1}))
        self.assertEqual(answer.json(), {"v": 1})
        self.assertEqual([r.method for r in host.sent], ["GET", "PUT"])
        self.assertIsInstance(Unavailable(), Fatal)


if __name__ == "__main__":
    unittest.main()
