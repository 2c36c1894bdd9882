// setpoint-sdk for JavaScript: write a Setpoint reconciler as a plain object or
// class with describe() and reconcile(host, request). The SDK decodes the spec,
// encodes the status, turns thrown errors into the WIT `reconcile-error` (a stray
// exception would otherwise trap the instance with no message), and hands back
// the state returned last time. This file imports nothing from the host: the
// component's imports live in host.js, so plain Node can run plugins in tests
// (see testing.js).

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

/** Call `plugin.reconcile` the way the host's side does. Returns an Outcome or
 * throws a Retry, RetryAfter or Fatal. */
export function callReconcile(plugin, host, request) {
  const { object, action, attempt } = request;
  const state = { ...request.state };
  try {
    if (plugin.checkSpec) plugin.checkSpec(object.spec);
    const outcome = plugin.reconcile(host, { key: request.key ?? key(object), action, object, spec: object.spec, attempt, state });
    return outcome ?? Outcome.done();
  } catch (e) {
    if (e instanceof Retry || e instanceof RetryAfter || e instanceof Fatal) throw e;
    throw new Retry(`the plugin threw ${e?.name ?? 'an error'}: ${e?.message ?? e}`, state);
  }
}

const pairs = (map) => Object.entries(map ?? {}).map(([k, v]) => [String(k), String(v)]);

function failure(e) {
  const val = e.tag === 'retry-after' ? { delay: BigInt(e.delayMs), message: e.message } : e.message;
  return { error: { tag: e.tag, val }, state: pairs(e.state) };
}

/** The `reconciler` (and `pruner`) exports for `plugin`, over the component's `host`. */
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
  return { reconciler, pruner };
}
