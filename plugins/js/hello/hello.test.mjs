// hello-js in plain Node, against the SDK's FakeHost (no Wasm): node --test
import test from 'node:test';
import assert from 'node:assert/strict';
import { Fatal, Retry } from '../../../sdk/js/index.js';
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

test('requeue after is passed on', () => {
  const o = { kind: 'Greeting', name: 'a', spec: { who: 'w', requeue_after_ms: 250 } };
  assert.equal(new FakeHost().reconcile(hello, 'created', o).requeueAfterMs, 250);
});
