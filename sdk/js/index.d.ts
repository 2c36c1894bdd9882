// TypeScript declarations for setpoint-sdk and the WIT types it maps
// (setpoint:reconciler@0.1.3, wit/reconciler.wit).

/** Why a reconcile happens (WIT `action`). */
export type Action = 'created' | 'updated' | 'deleted' | 'resynced';

/** WIT `log.level`. */
export type Level = 'trace' | 'debug' | 'info' | 'warn' | 'error';

/** WIT `info`: what a plugin says about itself. */
export interface Info {
  name: string;
  version: string;
  kinds: string[];
  resyncIntervalMs?: number;
}

/** WIT `object`, with spec and status decoded from JSON. */
export interface SetpointObject<Spec = unknown, Status = unknown> {
  kind: string;
  name: string;
  namespace: string;
  uid: string;
  generation: number;
  labels: Record<string, string>;
  spec: Spec;
  status?: Status;
  finalizers: string[];
  deleting: boolean;
}

/** WIT `request`. `state` is what the plugin returned last time for this key. */
export interface Request<Spec = unknown> {
  key: string;
  action: Action;
  object: SetpointObject<Spec>;
  spec: Spec;
  /** 0 on a first attempt; 1, 2, ... on retries. */
  attempt: number;
  state: Record<string, string>;
}

/** WIT `outcome`, built fluently. */
export class Outcome<Status = unknown> {
  status?: Status;
  state: Record<string, string>;
  requeueAfterMs?: number;
  static done<S = unknown>(): Outcome<S>;
  withStatus(status: Status): this;
  withState(key: string, value: string | number): this;
  requeueAfter(ms: number): this;
}

/** WIT `reconcile-error.retry`. */
export class Retry extends Error {
  constructor(message: string, state?: Record<string, string>);
  state: Record<string, string>;
}
/** WIT `reconcile-error.retry-after`. */
export class RetryAfter extends Error {
  constructor(delayMs: number, message: string, state?: Record<string, string>);
  delayMs: number;
  state: Record<string, string>;
}
/** WIT `reconcile-error.fatal`. */
export class Fatal extends Error {
  constructor(message: string, state?: Record<string, string>);
  state: Record<string, string>;
}

/** The WIT imports: log, objects, kv, clock. */
export interface Host {
  log(level: Level, message: string, fields?: Record<string, string | number>): void;
  get(kind: string, namespace: string, name: string): SetpointObject | undefined;
  list(kind: string, selector?: Record<string, string>): SetpointObject[];
  setStatus(kind: string, namespace: string, name: string, status: unknown): void;
  kvGet(key: string): string | undefined;
  kvSet(key: string, value: string | number): void;
  kvDelete(key: string): void;
  kvKeys(prefix: string): string[];
  /** Milliseconds since the Unix epoch (a component's Date.now() is frozen). */
  now(): number;
  reportDrift(detail: string): void;
}

/** A reconciler. */
export interface Plugin<Spec = unknown, Status = unknown> {
  describe(): Info;
  /**
   * Throw (with a message naming the field, e.g. `spec.who: expected a string`)
   * if the spec does not fit. A create, update or resync then fails as fatal
   * (`the spec of Greeting:x is invalid: spec.who: ...`) without calling
   * `reconcile`; a delete goes to `deleteInvalid` instead.
   */
  checkSpec?(spec: unknown): void;
  reconcile(host: Host, request: Request<Spec>): Outcome<Status> | undefined;
  /**
   * Clean up after a deleted object (action `deleted` or `object.deleting`)
   * whose spec `checkSpec` refuses. Such a delete cannot reach `reconcile`, and
   * must not fail for good either: the host keeps the object (and its finalizer)
   * until a delete succeeds. `request.spec` is the raw spec; `error` is what
   * `checkSpec` threw. Without it, the SDK logs a warning and succeeds, so the
   * host removes the object. Throw `Retry` to keep the object and try again.
   */
  deleteInvalid?(host: Host, request: Request<unknown>, error: string): Outcome<Status> | undefined;
  /**
   * Admission (WIT `admission.validate`): the host asks before it stores an
   * object of one of this plugin's kinds (create, update, apply; never delete).
   * Return a message naming the field (`spec.who: expected a string, got 5`) to
   * refuse the write, or nothing to admit it. Must not act on the world: it gets
   * no host. Without it, every object is admitted.
   */
  validate?(object: SetpointObject<unknown>): string | undefined | null | void;
  prune?(host: Host, desiredKeys: string[]): void;
}

/**
 * The component's `reconciler`, `pruner` and `admission` exports for a plugin
 * (world `plugin-with-admission`). Export all three from the component's entry:
 * `export const { reconciler, pruner, admission } = definePlugin(plugin, host);`
 */
export function definePlugin(plugin: Plugin<any, any>, host: Host): {
  reconciler: { describe(): unknown; reconcile(request: unknown): unknown };
  pruner: { prune(desiredKeys: string[]): void };
  admission: { validate(object: unknown): void };
};
