// setpoint-sdk for JavaScript: write a Setpoint reconciler as a plain object or
// class with describe() and reconcile(host, request). The SDK decodes the spec,
// encodes the status, turns thrown errors into the WIT `reconcile-error` (a stray
// exception would otherwise trap the instance with no message), and hands back
// the state returned last time. This file imports nothing from the host: the
// component's imports live in host.js, so plain Node can run plugins in tests
// (see testing.js).
//
// A spec the plugin's optional checkSpec(spec) throws on does not fit: a create,
// update or resync with it fails as Fatal ("the spec of Greeting:x is invalid:
// ..."), but a delete (action 'deleted' or object.deleting) still reaches the
// plugin, in deleteInvalid(host, request, error) (default: log a warning and
// succeed), so it can clean up and the host can release the object. Admission
// (the component's `admission.validate`, world plugin-with-admission) calls the
// plugin's optional validate(object), which returns a message naming the field
// to refuse the object, or nothing to admit it; without it, everything is
// admitted.

/** A transient failure: the host retries with its back-off. */
export class Retry extends Error {
  constructor(message, state = {}) { super(message); this.tag = 'retry'; this.state = state; }
}

/** A transient failure: the host retries after `delayMs`. */
export class RetryAfter extends Error {
  constructor(delayMs, message, state = {}) {
    super(message); this.tag = 'retry-after'; this.delayMs = delayMs; this.state = state;
  }
}

/** A permanent failure: no retry until the object changes. */
export class Fatal extends Error {
  constructor(message, state = {}) { super(message); this.tag = 'fatal'; this.state = state; }
}

/** A successful reconcile. */
export class Outcome {
  constructor() { this.status = undefined; this.state = {}; this.requeueAfterMs = undefined; }
  static done() { return new Outcome(); }
  withStatus(status) { this.status = status; return this; }
  withState(key, value) { this.state[key] = String(value); return this; }
  requeueAfter(ms) { this.requeueAfterMs = Number(ms); return this; }
}

const key = (o) => `${o.kind}:${o.namespace ? `${o.namespace}/` : ''}${o.name}`;

/** The plugin-facing object from the WIT record (spec and status decoded). */
export function fromWitObject(o) {
  return {
    kind: o.kind, name: o.name, namespace: o.namespace, uid: o.uid,
    generation: Number(o.generation), labels: Object.fromEntries(o.labels),
    spec: o.spec ? JSON.parse(o.spec) : undefined,
    status: o.status ? JSON.parse(o.status) : undefined,
    finalizers: [...o.finalizers], deleting: o.deleting,
  };
}

const isReconcileError = (e) => e instanceof Retry || e instanceof RetryAfter || e instanceof Fatal;

/** What a delete whose spec does not fit does when the plugin has no
 * `deleteInvalid`: log a warning and succeed, so the host removes the object. */
export function defaultDeleteInvalid(host, request, error) {
  host.log('warn', 'deleted with a spec that does not decode: nothing to clean up', { key: request.key, error });
  return Outcome.done();
}

/** Call `plugin.reconcile` the way the host's side does. Returns an Outcome or
 * throws a Retry, RetryAfter or Fatal. A spec `checkSpec` throws on is Fatal,
 * except on a delete, which goes to `plugin.deleteInvalid` (or the default). */
export function callReconcile(plugin, host, request) {
  const { object, action, attempt } = request;
  const state = { ...request.state };
  const req = { key: request.key ?? key(object), action, object, spec: object.spec, attempt, state };
  try {
    let problem;
    try {
      plugin.checkSpec?.(object.spec);
    } catch (e) {
      if (e instanceof Retry || e instanceof RetryAfter) throw e;
      problem = String(e?.message ?? e);
    }
    if (problem !== undefined) {
      if (action === 'deleted' || object.deleting) {
        const outcome = plugin.deleteInvalid ? plugin.deleteInvalid(host, req, problem) : defaultDeleteInvalid(host, req, problem);
        return outcome ?? Outcome.done();
      }
      throw new Fatal(`the spec of ${req.key} is invalid: ${problem}`, state);
    }
    const outcome = plugin.reconcile(host, req);
    return outcome ?? Outcome.done();
  } catch (e) {
    if (isReconcileError(e)) throw e;
    throw new Retry(`the plugin threw ${e?.name ?? 'an error'}: ${e?.message ?? e}`, state);
  }
}

/** Admission the way the component's `admission.validate` runs it: undefined
 * admits `object`, a string (naming the field) refuses it. Calls the plugin's
 * optional `validate(object)`; without one, everything is admitted. */
export function callValidate(plugin, object) {
  if (!plugin.validate) return undefined;
  let problem;
  try {
    problem = plugin.validate(object);
  } catch (e) {
    return `the plugin's validate threw ${e?.name ?? 'an error'}: ${e?.message ?? e}`;
  }
  return problem === undefined || problem === null || problem === '' ? undefined : String(problem);
}

const pairs = (map) => Object.entries(map ?? {}).map(([k, v]) => [String(k), String(v)]);

function failure(e) {
  const val = e.tag === 'retry-after' ? { delay: BigInt(e.delayMs), message: e.message } : e.message;
  return { error: { tag: e.tag, val }, state: pairs(e.state) };
}

/** The `reconciler`, `pruner` and `admission` exports (world
 * plugin-with-admission) for `plugin`, over the component's `host`. */
export function definePlugin(plugin, host) {
  const reconciler = {
    describe() {
      const info = plugin.describe();
      return {
        name: info.name, version: info.version, kinds: [...info.kinds],
        resyncInterval: info.resyncIntervalMs === undefined ? undefined : BigInt(info.resyncIntervalMs),
      };
    },
    reconcile(req) {
      let outcome;
      try {
        const object = fromWitObject(req.object);
        outcome = callReconcile(plugin, host, {
          key: req.key, action: req.action, object, attempt: req.attempt, state: Object.fromEntries(req.state),
        });
      } catch (e) {
        if (e instanceof Retry || e instanceof RetryAfter || e instanceof Fatal) throw failure(e);
        throw failure(new Fatal(`${e?.name ?? 'Error'}: ${e?.message ?? e}`, Object.fromEntries(req.state)));
      }
      return {
        requeueAfter: outcome.requeueAfterMs === undefined ? undefined : BigInt(outcome.requeueAfterMs),
        state: pairs(outcome.state),
        status: outcome.status === undefined ? undefined : JSON.stringify(outcome.status),
      };
    },
  };
  const pruner = {
    prune(desiredKeys) {
      try {
        plugin.prune?.(host, [...desiredKeys]);
      } catch (e) {
        const err = e instanceof Retry || e instanceof RetryAfter || e instanceof Fatal ? e : new Retry(String(e?.message ?? e));
        throw failure(err).error;
      }
    },
  };
  const admission = {
    validate(witObject) {
      let object;
      try {
        object = fromWitObject(witObject);
      } catch (e) {
        throw `spec: not JSON: ${e?.message ?? e}`;
      }
      const problem = callValidate(plugin, object);
      // A thrown string is the `err` of result<_, string>.
      if (problem !== undefined) throw problem;
    },
  };
  return { reconciler, pruner, admission };
}
