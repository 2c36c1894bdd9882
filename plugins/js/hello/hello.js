// hello-js: the `hello` plugin in JavaScript. It reconciles `Greeting` objects
// by writing a greeting into their status, and counts greetings in its
// key-value store, as plugins/hello does in Rust and plugins/python/hello in
// Python. `fail_until_attempt: N` fails (retry) until attempt N;
// `requeue_after_ms: N` asks to be called again.
import { Fatal, Outcome, Retry } from '../../../sdk/js/index.js';

/** What is wrong with a spec, naming the field, or undefined if it fits. */
function specProblem(spec) {
  if (spec === null || typeof spec !== 'object' || Array.isArray(spec)) return `spec: expected a mapping, got ${JSON.stringify(spec)}`;
  if (!('who' in spec)) return "spec: missing field 'who'";
  if (typeof spec.who !== 'string') return `spec.who: expected a string, got ${JSON.stringify(spec.who)}`;
  for (const field of ['fail_until_attempt', 'requeue_after_ms']) {
    if (spec[field] !== undefined && !Number.isInteger(spec[field])) return `spec.${field}: expected an integer, got ${JSON.stringify(spec[field])}`;
  }
  return undefined;
}

export const hello = {
  describe() {
    return { name: 'hello-js', version: '0.1.0', kinds: ['Greeting'] };
  },

  // Admission: refuse a spec that does not fit before it is stored.
  validate(object) {
    return specProblem(object.spec);
  },

  // The same check on every reconcile (objects stored before admission, or by
  // an older version of this plugin): fatal, but a delete still succeeds.
  checkSpec(spec) {
    const problem = specProblem(spec);
    if (problem) throw new Fatal(problem);
  },

  reconcile(host, req) {
    if (req.object.deleting) {
      host.log('info', 'goodbye', { who: req.spec.who });
      return Outcome.done();
    }
    if (req.attempt < (req.spec.fail_until_attempt ?? 0)) {
      const tried = Number(req.state.tried ?? 0) + 1;
      throw new Retry(`not yet: attempt ${req.attempt}`, { tried: String(tried) });
    }
    const greeted = Number(host.kvGet('greeted') ?? 0) + 1;
    host.kvSet('greeted', greeted);
    const greeting = `Hello, ${req.spec.who}!`;
    host.log('info', greeting, { greeted });
    const outcome = Outcome.done().withStatus({ greeting, greeted });
    if (req.state.tried !== undefined) outcome.withState('tried', req.state.tried);
    if (req.spec.requeue_after_ms !== undefined) outcome.requeueAfter(req.spec.requeue_after_ms);
    return outcome;
  },
};
