// Run a plugin in plain Node against an in-memory host: no Wasm. reconcile()
// takes the steps the real host takes (state hand-back between attempts,
// storing a returned status; a delete whose spec checkSpec refuses goes to the
// plugin's deleteInvalid), and validate() runs admission as the component's
// `admission.validate` does.
import { callReconcile, callValidate, Retry } from './index.js';

const keyOf = (o) => `${o.kind}:${o.namespace ? `${o.namespace}/` : ''}${o.name}`;

export class FakeHost {
  constructor() {
    this.objects = new Map(); this.kv = new Map(); this.logs = []; this.drift = []; this.clock = 0;
    this.states = new Map();
  }

  /** A stored object with defaults filled in. */
  put(o) {
    const object = { namespace: '', uid: '', generation: 1, labels: {}, finalizers: [], deleting: false, ...o };
    this.objects.set(keyOf(object), object);
    return object;
  }

  /** Reconcile like the host: returns the Outcome or throws Retry/RetryAfter/Fatal. */
  reconcile(plugin, action, o) {
    const object = this.put({ ...o, deleting: o.deleting || action === 'deleted' });
    const key = keyOf(object);
    const [attempt, state] = this.states.get(key) ?? [0, {}];
    try {
      const outcome = callReconcile(plugin, this, { key, action, object, attempt, state });
      this.states.set(key, [0, { ...outcome.state }]);
      if (outcome.status !== undefined) object.status = JSON.parse(JSON.stringify(outcome.status));
      return outcome;
    } catch (e) {
      this.states.set(key, [attempt + 1, { ...e.state }]);
      throw e;
    }
  }

  /** Admission, as the host asks before storing `o`: undefined admits it, a
   * message naming the field refuses it. Stores nothing. */
  validate(plugin, o) {
    const object = { namespace: '', uid: '', generation: 1, labels: {}, finalizers: [], deleting: false, ...o };
    return callValidate(plugin, object);
  }

  log(level, message, fields = {}) { this.logs.push([level, message, fields]); }
  get(kind, namespace, name) { return this.objects.get(keyOf({ kind, namespace, name })); }
  list(kind, selector = {}) {
    return [...this.objects.values()].filter((o) => o.kind === kind
      && Object.entries(selector).every(([k, v]) => o.labels[k] === v));
  }
  setStatus(kind, namespace, name, status) {
    const o = this.get(kind, namespace, name);
    if (!o) throw new Retry(`object ${kind}:${name} not found`);
    o.status = JSON.parse(JSON.stringify(status));
  }
  kvGet(key) { return this.kv.get(key); }
  kvSet(key, value) { this.kv.set(key, String(value)); }
  kvDelete(key) { this.kv.delete(key); }
  kvKeys(prefix) { return [...this.kv.keys()].filter((k) => k.startsWith(prefix)).sort(); }
  now() { return this.clock; }
  reportDrift(detail) { this.drift.push(detail); }
}
