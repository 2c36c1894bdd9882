// The component's entry: the plugin over the real host imports.
import { definePlugin } from '../../../sdk/js/index.js';
import { host } from '../../../sdk/js/host.js';
import { hello } from './hello.js';

export const { reconciler, pruner, admission } = definePlugin(hello, host);
