// The SDK's own steps, in plain Node against its FakeHost (no Wasm):
// cd sdk/js && node --test
import test from 'node:test';
import assert from 'node:assert/strict';
import { definePlugin, Fatal, Outcome, Retry } from './index.js';
import { FakeHost } from './testing.js';

// Only what a plugin must write, plus a spec check: the defaults for deletes
// and admission.
const plain = {
  describe() { return { name: 'plain', version: '0.0.0', kinds: ['Thing'] }; },
  checkSpec(spec) { if (typeof spec?.who !== 'string') throw new Fatal(`spec.who: expected a string, got ${JSON.stringify(spec?.who)}`); },
  reconcile(host, req) { return Outcome.done().withState('made', req.key); },
};

// Records the deletes it gets with a spec that does not fit, and has an
// admission rule.
function careful() {
  return {
    ...plain,
    deletes: [],
    validated: [],
    deleteInvalid(host, req, error) { this.deletes.push([req.action, req.spec, error, req.state]); },
    validate(object) {
      this.validated.push(object.spec);
      if (typeof object.spec?.who !== 'string') return `spec.who: expected a string, got ${JSON.stringify(object.spec?.who)}`;
      if (object.spec.who.length > 5) return 'spec.who: at most 5 characters';
      return undefined;
    },
  };
}

test('a create with a spec that does not fit is fatal and names the field', () => {
  const host = new FakeHost();
  for (const action of ['created', 'updated', 'resynced']) {
    assert.throws(() => host.reconcile(plain, action, { kind: 'Thing', name: 'x', spec: { who: 5 } }),
      (e) => e instanceof Fatal && e.message === 'the spec of Thing:x is invalid: spec.who: expected a string, got 5');
  }
});

test('a delete with a spec that does not fit succeeds by default', () => {
  const host = new FakeHost();
  assert.deepEqual(host.reconcile(plain, 'deleted', { kind: 'Thing', name: 'x', spec: { who: 5 } }), Outcome.done());
  assert.deepEqual(host.logs.at(-1), ['warn', 'deleted with a spec that does not decode: nothing to clean up',
    { key: 'Thing:x', error: 'spec.who: expected a string, got 5' }]);
  // A retried delete (deleting, another action) goes the same way.
  assert.ok(host.reconcile(plain, 'resynced', { kind: 'Thing', name: 'y', spec: null, deleting: true }));
});

test('a delete with a spec that does not fit reaches the plugin with the raw spec and its state', () => {
  const host = new FakeHost();
  const plugin = careful();
  host.reconcile(plugin, 'created', { kind: 'Thing', name: 'x', spec: { who: 'w' } });
  assert.deepEqual(host.reconcile(plugin, 'deleted', { kind: 'Thing', name: 'x', spec: { who: ['w'] } }), Outcome.done());
  assert.deepEqual(plugin.deletes, [['deleted', { who: ['w'] }, 'spec.who: expected a string, got ["w"]', { made: 'Thing:x' }]]);
  assert.equal(host.get('Thing', '', 'x').deleting, true);
});

test('deleteInvalid may ask to retry', () => {
  const plugin = { ...plain, deleteInvalid() { throw new Retry('not yet'); } };
  assert.throws(() => new FakeHost().reconcile(plugin, 'deleted', { kind: 'Thing', name: 'x', spec: {} }), Retry);
});

test('validate admits a good spec, refuses a bad one naming the field, and is the plugin hook', () => {
  const host = new FakeHost();
  const plugin = careful();
  assert.equal(host.validate(plugin, { kind: 'Thing', name: 'a', spec: { who: 'w' } }), undefined);
  assert.equal(host.validate(plugin, { kind: 'Thing', name: 'a', spec: { who: 5 } }), 'spec.who: expected a string, got 5');
  assert.equal(host.validate(plugin, { kind: 'Thing', name: 'a', spec: { who: 'longer' } }), 'spec.who: at most 5 characters');
  assert.deepEqual(plugin.validated, [{ who: 'w' }, { who: 5 }, { who: 'longer' }]);
  assert.equal(host.objects.size, 0); // admission stores nothing
  // Without a hook, everything is admitted; a hook that throws refuses.
  assert.equal(host.validate(plain, { kind: 'Thing', name: 'a', spec: { who: 5 } }), undefined);
  const broken = { ...plain, validate() { throw new TypeError('oops'); } };
  assert.equal(host.validate(broken, { kind: 'Thing', name: 'a', spec: {} }), "the plugin's validate threw TypeError: oops");
});

test('the admission export throws the message, the err of result<_, string>', () => {
  const { admission } = definePlugin(careful(), new FakeHost());
  const wit = (spec) => ({
    kind: 'Thing', name: 'a', namespace: '', uid: '', generation: 1n, labels: [], spec,
    status: undefined, finalizers: [], deleting: false,
  });
  assert.equal(admission.validate(wit('{"who":"w"}')), undefined);
  assert.throws(() => admission.validate(wit('{"who":5}')), (e) => e === 'spec.who: expected a string, got 5');
  assert.throws(() => admission.validate(wit('{')), (e) => typeof e === 'string' && e.startsWith('spec: not JSON: '));
});
