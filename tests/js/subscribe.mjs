// Drives the unmodified @fal-ai/client against kontextd through its proxy mode (x-fal-target-url).
// Usage: node subscribe.mjs <server base url> <api key>; prints one JSON line with what it saw.
import { createFalClient } from "@fal-ai/client";

const [baseUrl, key] = process.argv.slice(2);
const fal = createFalClient({ credentials: key, proxyUrl: { url: `${baseUrl}/`, when: "always" } });

const updates = [];
const result = await fal.subscribe("fal-ai/flux-pro/kontext/text-to-image", {
  input: { prompt: "a lighthouse at dusk", seed: 11, aspect_ratio: "16:9" },
  logs: true,
  pollInterval: 100,
  onQueueUpdate: (update) => updates.push({ status: update.status, logs: (update.logs || []).map((l) => l.message) }),
});
const run = await fal.run("fal-ai/flux-pro/kontext/text-to-image", { input: { prompt: "a boat", seed: 12 } });
console.log(JSON.stringify({ requestId: result.requestId, data: result.data, updates, run: run.data }));
