// The unmodified @fal-ai/client's storage through its proxy mode: fal.storage.upload(blob) (initiate through
// the proxy, then a PUT straight to the signed upload URL, with no key), an edit whose image_url is the
// uploaded URL, and one whose image_url is a Blob (the client uploads it by itself).
// Usage: node upload.mjs <server base url> <api key> <path of a PNG file>; prints one JSON line.
import { readFileSync } from "node:fs";
import { createFalClient } from "@fal-ai/client";

const [baseUrl, key, path] = process.argv.slice(2);
const fal = createFalClient({ credentials: key, proxyUrl: { url: `${baseUrl}/`, when: "always" } });
const png = readFileSync(path);

const url = await fal.storage.upload(new Blob([png], { type: "image/png" }));
const edit = (image_url) =>
  fal.subscribe("fal-ai/flux-pro/kontext/max", {
    input: { prompt: "add a rainbow", image_url, output_format: "png" },
    pollInterval: 100,
  });
const uploaded = await edit(url);
const blob = await edit(new Blob([png], { type: "image/png" }));
let refused = null;
try {
  await fal.storage.upload(new Blob(["<svg onload=alert(1)></svg>"], { type: "image/svg+xml" }));
} catch (error) {
  refused = { status: error.status, body: error.body };
}
console.log(JSON.stringify({ url, uploaded: uploaded.data, blob: blob.data, refused }));
