// Drives the unmodified @fal-ai/client's fal.stream against kontextd through its proxy mode.
// Usage: node stream.mjs <server base url> <api key>; prints one JSON line with every event and done().
import { createFalClient } from "@fal-ai/client";

const [baseUrl, key] = process.argv.slice(2);
const fal = createFalClient({ credentials: key, proxyUrl: { url: `${baseUrl}/`, when: "always" } });

const stream = await fal.stream("fal-ai/flux-pro/kontext/text-to-image", {
  input: { prompt: "a kite at noon", seed: 21, aspect_ratio: "9:16" },
});
const events = [];
for await (const event of stream) events.push(event);
const done = await stream.done();
console.log(JSON.stringify({ events, done, requestId: stream.requestId }));
