"""records-py in plain CPython, against the SDK's FakeHost (no Wasm)."""

import json
import unittest

from app import Records
from setpoint_sdk import Action, Fatal, Object, Retry
from setpoint_sdk.http import Denied, Response
from setpoint_sdk.testing import FakeHost


def api(host, fail=0):
    """A fake API: documents by URL; the first `fail` requests answer 503."""
    docs = {}
    left = [fail]

    def answer(request):
        if left[0] > 0:
            left[0] -= 1
            return Response(503)
        if request.method == "GET":
            return Response(200, body=docs[request.url]) if request.url in docs else Response(404)
        if request.method == "PUT":
            docs[request.url] = request.body
            return Response(200)
        if request.method == "DELETE":
            return Response(204) if docs.pop(request.url, None) is not None else Response(404)
        return Response(405)

    host.on_http(answer)
    return docs


class RecordsTest(unittest.TestCase):
    def record(self):
        return Object("Record", "a", spec={"endpoint": "http://api/records", "data": {"v": 1}})

    def test_creates_then_is_in_sync_then_replaces_drift_then_deletes(self):
        host = FakeHost()
        docs = api(host)
        obj = self.record()
        self.assertEqual(host.reconcile(Records(), Action.CREATED, obj).status["remote"], "created")
        self.assertEqual(json.loads(docs["http://api/records/_/a"]), {"v": 1})
        self.assertEqual(host.reconcile(Records(), Action.RESYNCED, obj).status["remote"], "in-sync")
        docs["http://api/records/_/a"] = b'{"v": 2}'
        self.assertEqual(host.reconcile(Records(), Action.RESYNCED, obj).status["remote"], "replaced")
        self.assertEqual(len(host.drift), 1)
        host.reconcile(Records(), Action.DELETED, obj)
        self.assertEqual(docs, {})

    def test_a_5xx_is_retried_and_a_denied_request_is_fatal(self):
        host = FakeHost()
        api(host, fail=1)
        with self.assertRaises(Retry):
            host.reconcile(Records(), Action.CREATED, self.record())
        host.reconcile(Records(), Action.CREATED, self.record())

        denied = FakeHost()

        def refuse(request):
            raise Denied(request.url)

        denied.on_http(refuse)
        with self.assertRaises(Fatal) as caught:
            denied.reconcile(Records(), Action.CREATED, self.record())
        self.assertIn("denied", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
