"""swaptest-py: plugins/swaptest in Python, for the hot-swap benchmark
(`cargo xtask swap-bench`). Same name and kind (`Swap`) as the Rust
swaptest, so each can be swapped in for the other; it describes itself as
version `py-1.0.0`.

The spec is the Rust plugin's: `mode` (plain, requeue, retry), `n` (calls the
key takes), `delay-ms` and `record`. Each call writes the status the Rust
plugin writes (`version`, `calls`, `started-us` from the wall clock, `done`,
and unless `record` is false `versions`); unlike the Rust plugin it keeps no
per-call records in the key-value store.
"""

import time

from setpoint_sdk import Info, Outcome, Plugin, RetryAfter, export_all

VERSION = "py-1.0.0"


class SwapTest(Plugin):
    # The spec arrives as a plain dict: its keys (`delay-ms`) are not Python names.
    Spec = None

    def describe(self) -> Info:
        return Info("swaptest", VERSION, ["Swap"])

    def reconcile(self, host, req) -> Outcome:
        if req.object.deleting:
            return Outcome.done()
        started_us = time.time_ns() // 1000
        spec = req.spec or {}
        mode = spec.get("mode", "plain")
        want = 1 if mode == "plain" else max(1, int(spec.get("n", 1)))
        delay = int(spec.get("delay-ms", 20))
        generation = str(req.object.generation)
        call = 0
        if req.state.get("generation") == generation:
            call = int(req.state.get("calls", "0"))
        last = call + 1 >= want
        status = {
            "version": VERSION,
            "calls": call + 1,
            "started-us": started_us,
            "done": last,
        }
        if spec.get("record", True):
            versions = []
            if call > 0 and isinstance(req.object.status, dict):
                versions = list(req.object.status.get("versions", []))
            versions.append(VERSION)
            status["versions"] = versions
        o = req.object
        host.set_status(o.kind, o.namespace, o.name, status)
        state = {"calls": str(call + 1), "generation": generation}
        if not last and mode == "retry":
            raise RetryAfter(delay, f"call {call + 1} of {want}", state=state)
        outcome = Outcome.done()
        for k, v in state.items():
            outcome.with_state(k, v)
        if not last and mode == "requeue":
            outcome.requeue_after(delay)
        return outcome


# componentize-py exports the classes named `Reconciler`, `Pruner` and
# `Admission` (world plugin-with-admission). Outside a component build (unit
# tests) there are no bindings to export to.
try:
    Reconciler, Pruner, Admission = export_all(SwapTest)
except ImportError:
    pass
