// hello-js: the `hello` plugin in JavaScript. It reconciles `Greeting` objects
// by writing a greeting into their status, and counts greetings in its
// key-value store, as plugins/hello does in Rust and plugins/python/hello in
// Python. `fail_until_attempt: N` fails (retry) until attempt N;
// `requeue_after_ms: N` asks to be called again.
import { Fatal, Outcome, Retry } from '../../../sdk/js/index.js';

export const hello = {
  describe() {
    return { name: 'hello-js', version: '0.1.0', kinds: ['Greeting'] };
  },

  checkSpec(spec) {
    if (typeof spec?.who !== 'string') throw new Fatal('the spec needs `who`, a string');
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
