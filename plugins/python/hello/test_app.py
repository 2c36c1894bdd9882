"""hello-py in plain CPython, against the SDK's FakeHost (no Wasm)."""

import unittest

from app import Hello
from setpoint_sdk import Action, Fatal, Object, Outcome, Retry
from setpoint_sdk.testing import FakeHost


class HelloTest(unittest.TestCase):
    def test_hello_greets_and_counts(self):
        host = FakeHost()
        host.reconcile(Hello(), Action.CREATED, Object("Greeting", "a", spec={"who": "world"}))
        outcome = host.reconcile(Hello(), Action.CREATED, Object("Greeting", "b", spec={"who": "you"}))
        self.assertEqual(outcome.status.greeting, "Hello, you!")
        self.assertEqual(outcome.status.greeted, 2)
        self.assertEqual(host.get("Greeting", "", "a").status["greeting"], "Hello, world!")
        self.assertTrue(any(m == "Hello, world!" for _, m, _ in host.logs))

    def test_hello_retries_until_the_attempt_and_keeps_its_state(self):
        host = FakeHost()
        obj = Object("Greeting", "a", spec={"who": "w", "fail_until_attempt": 2})
        for _ in range(2):
            with self.assertRaises(Retry):
                host.reconcile(Hello(), Action.CREATED, obj)
        outcome = host.reconcile(Hello(), Action.CREATED, obj)
        self.assertEqual(outcome.state, {"tried": "2"})

    def test_a_spec_that_does_not_fit_is_fatal_and_names_the_field(self):
        with self.assertRaises(Fatal) as err:
            FakeHost().reconcile(Hello(), Action.CREATED, Object("Greeting", "a", spec={"whom": "x"}))
        self.assertIn("whom", err.exception.message)

    def test_a_greeting_whose_spec_does_not_decode_can_still_be_deleted(self):
        host = FakeHost()
        with self.assertRaises(Fatal) as err:
            host.reconcile(Hello(), Action.CREATED, Object("Greeting", "x", spec={"who": 5}))
        self.assertEqual(err.exception.message,
                         "the spec of Greeting:x is invalid: spec.who: expected str, got int 5")
        outcome = host.reconcile(Hello(), Action.DELETED, Object("Greeting", "x", spec={"who": 5}))
        self.assertEqual(outcome, Outcome.done())

    def test_admission_names_the_field(self):
        host = FakeHost()
        self.assertIsNone(host.validate(Hello(), Object("Greeting", "a", spec={"who": "w"})))
        self.assertEqual(host.validate(Hello(), Object("Greeting", "x", spec={"who": 5})),
                         "spec.who: expected str, got int 5")
        self.assertEqual(host.validate(Hello(), Object("Greeting", "y", spec={})),
                         "spec: missing field 'who'")
        self.assertEqual(
            host.validate(Hello(), Object("Greeting", "z", spec={"who": "w", "fail_until_attempt": "2"})),
            "spec.fail_until_attempt: expected int, got str '2'")

    def test_requeue_after_is_passed_on(self):
        outcome = FakeHost().reconcile(
            Hello(), Action.CREATED, Object("Greeting", "a", spec={"who": "w", "requeue_after_ms": 250}))
        self.assertEqual(outcome.requeue_after_ms, 250)


if __name__ == "__main__":
    unittest.main()
