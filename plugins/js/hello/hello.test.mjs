// hello-js in plain Node, against the SDK's FakeHost (no Wasm): node --test
import test from 'node:test';
import assert from 'node:assert/strict';
import { Fatal, Outcome, Retry } from '../../../sdk/js/index.js';
import { FakeHost } from '../../../sdk/js/testing.js';
import { hello } from './hello.js';

test('hello greets and counts', () => {
  const host = new FakeHost();
  host.reconcile(hello, 'created', { kind: 'Greeting', name: 'a', spec: { who: 'world' } });
  const outcome = host.reconcile(hello, 'created', { kind: 'Greeting', name: 'b', spec: { who: 'you' } });
  assert.deepEqual(outcome.status, { greeting: 'Hello, you!', greeted: 2 });
  assert.equal(host.get('Greeting', '', 'a').status.greeting, 'Hello, world!');
  assert.ok(host.logs.some(([, m]) => m === 'Hello, world!'));
});

test('hello retries until the attempt and keeps its state', () => {
  const host = new FakeHost();
  const o = { kind: 'Greeting', name: 'a', spec: { who: 'w', fail_until_attempt: 2 } };
  assert.throws(() => host.reconcile(hello, 'created', o), Retry);
  assert.throws(() => host.reconcile(hello, 'created', o), Retry);
  assert.deepEqual(host.reconcile(hello, 'created', o).state, { tried: '2' });
});

test('a spec without who is fatal', () => {
  assert.throws(() => new FakeHost().reconcile(hello, 'created', { kind: 'Greeting', name: 'a', spec: {} }), Fatal);
});

test('a greeting whose spec does not fit can still be deleted', () => {
  const host = new FakeHost();
  const bad = { kind: 'Greeting', name: 'x', spec: { who: 5 } };
  assert.throws(() => host.reconcile(hello, 'created', bad),
    (e) => e instanceof Fatal && e.message === 'the spec of Greeting:x is invalid: spec.who: expected a string, got 5');
  assert.deepEqual(host.reconcile(hello, 'deleted', bad), Outcome.done());
  assert.deepEqual(host.logs.at(-1), ['warn', 'deleted with a spec that does not decode: nothing to clean up',
    { key: 'Greeting:x', error: 'spec.who: expected a string, got 5' }]);
});

test('admission names the field', () => {
  const host = new FakeHost();
  assert.equal(host.validate(hello, { kind: 'Greeting', name: 'a', spec: { who: 'w' } }), undefined);
  assert.equal(host.validate(hello, { kind: 'Greeting', name: 'x', spec: { who: 5 } }), 'spec.who: expected a string, got 5');
  assert.equal(host.validate(hello, { kind: 'Greeting', name: 'y', spec: {} }), "spec: missing field 'who'");
  assert.equal(host.validate(hello, { kind: 'Greeting', name: 'z', spec: { who: 'w', requeue_after_ms: '1s' } }),
    'spec.requeue_after_ms: expected an integer, got "1s"');
});

test('requeue after is passed on', () => {
  const o = { kind: 'Greeting', name: 'a', spec: { who: 'w', requeue_after_ms: 250 } };
  assert.equal(new FakeHost().reconcile(hello, 'created', o).requeueAfterMs, 250);
});
