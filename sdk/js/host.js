// The real host: the component's imports (setpoint:reconciler@0.1.3), as the
// Host the SDK hands a plugin. Import it only in a plugin's component entry.
import { log } from 'setpoint:reconciler/log@0.1.3';
import * as objects from 'setpoint:reconciler/objects@0.1.3';
import * as kv from 'setpoint:reconciler/kv@0.1.3';
import { now } from 'setpoint:reconciler/clock@0.1.3';
import { fromWitObject, Retry } from './index.js';

const enc = new TextEncoder();
const dec = new TextDecoder();

export const host = {
  log(level, message, fields = {}) {
    log(level, message, Object.entries(fields).map(([k, v]) => [k, String(v)]));
  },
  get(kind, namespace, name) {
    const o = objects.get(kind, namespace, name);
    return o === undefined ? undefined : fromWitObject(o);
  },
  list(kind, selector = {}) {
    return objects.list(kind, Object.entries(selector)).map(fromWitObject);
  },
  setStatus(kind, namespace, name, status) {
    try {
      objects.setStatus(kind, namespace, name, JSON.stringify(status));
    } catch (e) {
      throw new Retry(`set-status of ${kind}:${name} failed: ${e?.payload ?? e}`);
    }
  },
  kvGet(key) { const v = kv.get(key); return v === undefined ? undefined : dec.decode(v); },
  kvSet(key, value) { kv.set(key, enc.encode(String(value))); },
  kvDelete(key) { kv.delete(key); },
  kvKeys(prefix) { return kv.keys(prefix); },
  /** Milliseconds since the Unix epoch. Use this, not Date.now(): a component's
   * Date.now() is frozen at build time. */
  now() { return Number(now()); },
  reportDrift(detail) { objects.reportDrift(detail); },
};
