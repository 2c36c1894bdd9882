// Build one JavaScript plugin into a component with componentize-js:
//   node build.mjs ENTRY.js OUT.wasm [WORLD]
// Run from the folder that holds wit/ (componentize-js wants the WIT folder
// under the current directory). Only the WIT's imports are linked: no WASI
// http, random, clocks or stdio.
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';

// The SDK's definePlugin exports reconciler, pruner and admission.
const [entry, out, world = 'plugin-with-admission'] = process.argv.slice(2);
if (!entry || !out) {
  console.error('usage: node build.mjs ENTRY.js OUT.wasm [WORLD]');
  process.exit(2);
}
const started = performance.now();
const { component } = await componentize({
  sourcePath: entry,
  witPath: 'wit',
  worldName: world,
  disableFeatures: ['http', 'fetch-event', 'random', 'clocks', 'stdio'],
});
await writeFile(out, component);
console.error(`${out}: ${component.length} bytes in ${((performance.now() - started) / 1000).toFixed(1)} s`);
