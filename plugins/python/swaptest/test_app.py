"""swaptest-py in plain CPython, against the SDK's FakeHost (no Wasm)."""

import unittest

from app import VERSION, SwapTest
from setpoint_sdk import Action, Object, RetryAfter
from setpoint_sdk.testing import FakeHost


class SwapTestTest(unittest.TestCase):
    def test_a_requeue_key_takes_n_calls(self):
        host = FakeHost()
        obj = Object("Swap", "a", spec={"mode": "requeue", "n": 3, "delay-ms": 5})
        for i in range(3):
            outcome = host.reconcile(SwapTest(), Action.RESYNCED, obj)
            self.assertEqual(outcome.requeue_after_ms is not None, i < 2, f"call {i}")
        status = host.get("Swap", "", "a").status
        self.assertEqual(status["versions"], [VERSION] * 3)
        self.assertTrue(status["done"])

    def test_a_retry_key_fails_with_retry_after_until_its_last_call(self):
        host = FakeHost()
        obj = Object("Swap", "b", spec={"mode": "retry", "n": 2, "delay-ms": 7})
        with self.assertRaises(RetryAfter) as err:
            host.reconcile(SwapTest(), Action.CREATED, obj)
        self.assertEqual(err.exception.delay_ms, 7)
        host.reconcile(SwapTest(), Action.RESYNCED, obj)
        self.assertEqual(host.get("Swap", "", "b").status["calls"], 2)

    def test_a_plain_key_is_done_at_once(self):
        host = FakeHost()
        host.reconcile(SwapTest(), Action.CREATED, Object("Swap", "c", spec={}))
        self.assertEqual(host.get("Swap", "", "c").status["version"], VERSION)


if __name__ == "__main__":
    unittest.main()
