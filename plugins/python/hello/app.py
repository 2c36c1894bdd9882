"""hello-py: the `hello` plugin in Python. It reconciles `Greeting` objects by
writing a greeting into their status, and counts greetings in its key-value
store, as plugins/hello does in Rust.

Two optional spec fields show the engine's retry and requeue paths:
`fail_until_attempt: N` fails (retry) until attempt N, keeping the attempts in
the state it hands back; `requeue_after_ms: N` asks to be called again.
"""

from dataclasses import dataclass
from typing import Optional

from setpoint_sdk import Info, Level, Outcome, Plugin, Retry, export_all


@dataclass
class Spec:
    who: str
    fail_until_attempt: int = 0
    requeue_after_ms: Optional[int] = None


@dataclass
class Status:
    greeting: str
    greeted: int


class Hello(Plugin):
    Spec = Spec

    def describe(self) -> Info:
        return Info("hello-py", "0.1.0", ["Greeting"])

    def reconcile(self, host, req) -> Outcome:
        if req.object.deleting:
            host.log(Level.INFO, "goodbye", who=req.spec.who)
            return Outcome.done()
        if req.attempt < req.spec.fail_until_attempt:
            tried = int(req.state.get("tried", "0")) + 1
            raise Retry(f"not yet: attempt {req.attempt}", state={"tried": str(tried)})
        greeted = int((host.kv_get("greeted") or b"0").decode()) + 1
        host.kv_set("greeted", str(greeted).encode())
        greeting = f"Hello, {req.spec.who}!"
        host.log(Level.INFO, greeting, greeted=greeted)
        outcome = Outcome.done().with_status(Status(greeting, greeted))
        if "tried" in req.state:
            outcome.with_state("tried", req.state["tried"])
        if req.spec.requeue_after_ms is not None:
            outcome.requeue_after(req.spec.requeue_after_ms)
        return outcome


# componentize-py exports the classes named `Reconciler`, `Pruner` and
# `Admission` (world plugin-with-admission). Outside a component build (unit
# tests) there are no bindings to export to.
try:
    Reconciler, Pruner, Admission = export_all(Hello)
except ImportError:
    pass
