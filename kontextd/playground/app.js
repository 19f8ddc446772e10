// kontextd playground: a client of this server's own API (no framework, nothing from the internet).
//
// The endpoints come from GET /v1/endpoints, their fields from /openapi.json (each POST /{app_id} request
// schema: defaults, enums, bounds). Input images are uploaded through fal's storage API
// (POST /storage/upload/initiate, then PUT the bytes to the signed URL), or sent as data: URIs where the
// server has no upload API. A request is followed over its status stream (server-sent events) read with
// fetch(), not EventSource, so that the API key can be sent with it.

const STORE = {
  key: "kontextd.playground.apiKey",
  endpoint: "kontextd.playground.endpoint",
  history: "kontextd.playground.history",
};
const HISTORY_LIMIT = 50;
const GALLERY_LIMIT = 24;
const PROMPT_KEPT = 120; // characters of a prompt kept in the history
const IMAGE_TYPES = "image/png,image/jpeg,image/webp,image/gif";
const STEP = /(\d+)\s*\/\s*(\d+)/; // "step 3/28"

const $ = (id) => document.getElementById(id);

const state = {
  endpoints: [],
  schema: null, // the OpenAPI document
  fields: new Map(), // name → {kind, element, prop, default, values}
  files: new Map(), // image field name → [File]
  uploaded: new WeakMap(), // File → its URL once uploaded (a file chosen once is uploaded once)
  thumbs: new Map(), // image field name → [object URL], revoked when replaced
  running: null, // {job, controller} while a request runs
  logKeys: new Set(), // the log lines shown for the request followed now
  needsKey: false,
};

// -- small helpers ------------------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function load(name, fallback) {
  try {
    const value = localStorage.getItem(name);
    return value === null ? fallback : JSON.parse(value);
  } catch {
    return fallback;
  }
}

function save(name, value) {
  try {
    localStorage.setItem(name, JSON.stringify(value));
  } catch {
    // Storage full or disabled: the page works on, without remembering.
  }
}

function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Key ${key}` } : extra;
}

// The API answers absolute URLs (status_url, response_url, upload_url), named after the host it was asked
// on or its configured public URL. The page only ever connects to its own origin (its CSP says so): it
// follows their paths here.
function local(url) {
  const parsed = new URL(url, location.href);
  return parsed.pathname + parsed.search;
}

async function api(path, { method = "GET", json, headers = {}, signal } = {}) {
  const options = { method, headers: authHeaders(headers), signal };
  if (json !== undefined) {
    options.body = JSON.stringify(json);
    options.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, options);
  let body = null;
  const text = await response.text();
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { detail: text.slice(0, 500) };
  }
  return { ok: response.ok, status: response.status, body };
}

function describeError(response) {
  const detail = response.body && response.body.detail;
  if (Array.isArray(detail)) {
    return detail.map((item) => `${fieldName(item.loc)}: ${item.msg}`).join("; ");
  }
  if (typeof detail === "string") return detail;
  return `HTTP ${response.status}`;
}

function fieldName(loc) {
  if (!Array.isArray(loc)) return "request";
  const parts = loc[0] === "body" ? loc.slice(1) : loc;
  return parts.length ? parts.join(".") : "request";
}

function setStatus(text) {
  $("status").textContent = text;
}

function showFormError(text) {
  const box = $("form-error");
  box.textContent = text || "";
  box.hidden = !text;
}

// -- endpoints and their schemas ----------------------------------------------------------------------

async function loadEndpoints() {
  showFormError("");
  let listed, schema;
  try {
    [listed, schema] = await Promise.all([api("/v1/endpoints"), api("/openapi.json")]);
  } catch (error) {
    showFormError(`Cannot reach the server: ${error.message}`);
    return;
  }
  if (listed.status === 401 || listed.status === 403) {
    state.needsKey = true;
    showFormError("This server needs an API key: enter it above.");
    setStatus("Waiting for an API key.");
    return;
  }
  if (!listed.ok || !schema.ok) {
    showFormError(`Cannot list the endpoints: ${describeError(listed.ok ? schema : listed)}`);
    return;
  }
  state.needsKey = false;
  state.endpoints = listed.body.endpoints;
  state.schema = schema.body;
  const select = $("endpoint");
  const chosen = select.value || load(STORE.endpoint, null);
  select.replaceChildren(
    ...state.endpoints.map((endpoint) =>
      el("option", {
        value: endpoint.app_id,
        text: `${endpoint.title} (${endpoint.app_id})${endpoint.status === "ready" ? "" : ` [${endpoint.status}]`}`,
      }),
    ),
  );
  if (state.endpoints.some((endpoint) => endpoint.app_id === chosen)) select.value = chosen;
  renderFields();
  setStatus("Idle.");
}

function resolve(schema) {
  let current = schema;
  for (let depth = 0; current && current.$ref && depth < 10; depth++) {
    const path = current.$ref.replace(/^#\//, "").split("/");
    current = path.reduce((node, part) => (node ? node[part] : undefined), state.schema);
  }
  return current || {};
}

function requestSchema(appId) {
  const operation = state.schema.paths[`/${appId}`]?.post;
  const body = operation?.requestBody?.content?.["application/json"]?.schema;
  return body ? resolve(body) : { properties: {} };
}

function isImageField(name, prop) {
  if (!/_urls?$/.test(name)) return false;
  const item = prop.type === "array" ? resolve(prop.items || {}) : prop;
  return item.type === "string";
}

function imageLabel(prop, name) {
  const title = prop.title || name;
  return title.replace(/\s*Urls?$/i, (match) => (/s$/i.test(match) ? "s" : "")) || title;
}

function renderFields() {
  const appId = $("endpoint").value;
  save(STORE.endpoint, appId);
  const endpoint = state.endpoints.find((item) => item.app_id === appId);
  $("endpoint-help").textContent = endpoint
    ? `${endpoint.backend} backend, ${endpoint.status}${endpoint.reason ? `: ${endpoint.reason}` : ""}` +
      (endpoint.model ? ` (${endpoint.model})` : "")
    : "";
  const schema = requestSchema(appId);
  const required = new Set(schema.required || []);
  const previous = new Map([...state.fields].map(([name, field]) => [name, field]));
  state.fields.clear();
  const images = [];
  const options = [];
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    const prop = resolve(raw);
    if (name === "prompt") {
      const prompt = $("prompt");
      if (prop.maxLength) prompt.maxLength = prop.maxLength;
      state.fields.set(name, { kind: "prompt", element: prompt, prop });
      continue;
    }
    if (isImageField(name, prop)) images.push(imageField(name, prop, required.has(name)));
    else options.push(optionField(name, prop, required.has(name), previous.get(name)));
  }
  $("image-fields").replaceChildren(...images);
  $("fields").replaceChildren(...options);
  for (const name of [...state.files.keys()]) {
    if (state.fields.has(name)) renderThumbs(name);
    else state.files.delete(name);
  }
}

function fieldBox(name, label, control, help, extra = []) {
  const helpId = `field-${name}-help`;
  const errorId = `field-${name}-error`;
  control.setAttribute("aria-describedby", `${helpId} ${errorId}`);
  return el(
    "div",
    { class: "field", "data-field": name },
    el("label", { for: control.id, text: label }),
    control,
    ...extra,
    el("span", { id: helpId, class: "help", text: help || "", title: help || undefined }),
    el("span", { id: errorId, class: "error", hidden: true }),
  );
}

function optionField(name, prop, isRequired, previous) {
  const variants = (prop.anyOf || prop.oneOf || [prop]).map(resolve);
  const nullable = variants.some((variant) => variant.type === "null");
  const concrete = variants.filter((variant) => variant.type !== "null");
  const enumerated = concrete.find((variant) => Array.isArray(variant.enum));
  const id = `field-${name}`;
  const label = prop.title || name;
  const fallback = prop.default;
  let field;
  if (enumerated) {
    const values = enumerated.enum;
    const select = el("select", { id, name });
    if (fallback === undefined || nullable) {
      select.append(el("option", { value: "", text: isRequired ? "(choose)" : "(default)" }));
    }
    values.forEach((value, index) => select.append(el("option", { value: String(index), text: String(value) })));
    const at = values.indexOf(fallback);
    select.value = at >= 0 ? String(at) : "";
    field = { kind: "enum", element: select, values };
  } else if (concrete.length === 1 && concrete[0].type === "boolean") {
    const box = el("input", { id, name, type: "checkbox" });
    box.checked = fallback === true;
    field = { kind: "boolean", element: box };
  } else if (concrete.length === 1 && ["integer", "number"].includes(concrete[0].type)) {
    const numeric = concrete[0];
    const input = el("input", {
      id,
      name,
      type: "number",
      inputmode: numeric.type === "integer" ? "numeric" : "decimal",
      min: numeric.minimum ?? numeric.exclusiveMinimum,
      max: numeric.maximum ?? numeric.exclusiveMaximum,
      step: numeric.type === "integer" ? 1 : "any",
      placeholder: fallback === undefined ? (name === "seed" ? "random" : "(default)") : undefined,
    });
    input.value = fallback === undefined || fallback === null ? "" : String(fallback);
    field = { kind: numeric.type, element: input };
  } else if (concrete.length === 1 && concrete[0].type === "string") {
    const input = el("input", { id, name, type: "text", maxlength: concrete[0].maxLength });
    input.value = typeof fallback === "string" ? fallback : "";
    field = { kind: "string", element: input };
  } else {
    const area = el("textarea", { id, name, rows: 2, spellcheck: "false", class: "json" });
    area.value = fallback === undefined ? "" : JSON.stringify(fallback);
    field = { kind: "json", element: area };
  }
  field.prop = prop;
  field.default = fallback;
  field.required = isRequired;
  // A value typed for this field on the previous endpoint carries over when it still fits.
  if (previous && previous.kind === field.kind && previous.touched) {
    if (field.kind === "boolean") field.element.checked = previous.element.checked;
    else if (field.kind !== "enum" || field.values.join() === previous.values.join()) {
      field.element.value = previous.element.value;
    }
    field.touched = true;
  }
  field.element.addEventListener("input", () => (field.touched = true));
  field.element.addEventListener("change", () => (field.touched = true));
  state.fields.set(name, field);
  const help = [prop.description, enumerated && concrete.length > 1 ? "Other shapes: through the API." : ""]
    .filter(Boolean)
    .join(" ");
  return fieldBox(name, label, field.element, help);
}

function imageField(name, prop, isRequired) {
  const multiple = prop.type === "array";
  const limit = multiple ? prop.maxItems || 4 : 1;
  const id = `field-${name}`;
  const label = imageLabel(prop, name);
  const picker = el("input", { id, name, type: "file", accept: IMAGE_TYPES, multiple });
  const urls = el(multiple ? "textarea" : "input", {
    id: `${id}-url`,
    type: multiple ? undefined : "url",
    rows: multiple ? 2 : undefined,
    placeholder: multiple ? "https://… (one a line)" : "https://…",
    spellcheck: "false",
  });
  const thumbs = el("ul", { class: "thumbs", id: `${id}-thumbs`, "aria-label": `${label}: chosen files` });
  picker.addEventListener("change", () => chooseFiles(name, [...picker.files], multiple, limit, false));
  const zone = fieldBox(
    name,
    label + (isRequired ? "" : " (optional)"),
    picker,
    `${prop.description || ""} Drop ${multiple ? `up to ${limit} images` : "an image"} here, choose ` +
      `${multiple ? "them" : "one"}, or give ${multiple ? "URLs" : "a URL"}.`,
    [el("label", { for: urls.id, class: "sub", text: `${label}: or by URL` }), urls, thumbs],
  );
  zone.classList.add("drop");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const dropped = [...(event.dataTransfer?.files || [])].filter((file) => file.type.startsWith("image/"));
    chooseFiles(name, dropped, multiple, limit, multiple);
  });
  state.fields.set(name, { kind: "image", element: picker, urls, prop, multiple, limit, required: isRequired });
  return zone;
}

function chooseFiles(name, files, multiple, limit, append) {
  const current = append ? state.files.get(name) || [] : [];
  const chosen = [...current, ...files].slice(0, multiple ? limit : 1);
  if (chosen.length) state.files.set(name, chosen);
  else state.files.delete(name);
  renderThumbs(name);
}

function renderThumbs(name) {
  for (const url of state.thumbs.get(name) || []) URL.revokeObjectURL(url);
  const list = $(`field-${name}-thumbs`);
  if (!list) return;
  const files = state.files.get(name) || [];
  const urls = files.map((file) => URL.createObjectURL(file));
  state.thumbs.set(name, urls);
  list.replaceChildren(
    ...files.map((file, index) =>
      el(
        "li",
        {},
        el("img", { src: urls[index], alt: file.name, width: 64, height: 64 }),
        el("button", {
          type: "button",
          class: "secondary small",
          "aria-label": `Remove ${file.name}`,
          text: "Remove",
          onclick: () => {
            chooseFiles(name, files.filter((_, at) => at !== index), true, files.length, false);
            $(`field-${name}`).focus();
          },
        }),
      ),
    ),
  );
}

// -- the request --------------------------------------------------------------------------------------

class FieldError extends Error {
  constructor(name, message) {
    super(message);
    this.field = name;
  }
}

function readFile(file) {
  return new Promise((done, fail) => {
    const reader = new FileReader();
    reader.onload = () => done(reader.result);
    reader.onerror = () => fail(reader.error);
    reader.readAsDataURL(file);
  });
}

async function upload(name, file) {
  if (state.uploaded.has(file)) return state.uploaded.get(file);
  const initiated = await api("/storage/upload/initiate?storage_type=fal-cdn-v3", {
    method: "POST",
    json: { content_type: file.type || "application/octet-stream", file_name: file.name },
  });
  if (initiated.status === 404 || initiated.status === 405) {
    return readFile(file); // a server without the upload API: the image inline, as a data: URI
  }
  if (!initiated.ok) throw new FieldError(name, `${file.name}: ${describeError(initiated)}`);
  const stored = await fetch(local(initiated.body.upload_url), {
    method: "PUT",
    headers: { "Content-Type": file.type },
    body: file,
  });
  if (!stored.ok) {
    let body = null;
    try {
      body = await stored.json();
    } catch {
      // not JSON: the status says enough
    }
    throw new FieldError(name, `${file.name}: ${describeError({ status: stored.status, body })}`);
  }
  state.uploaded.set(file, initiated.body.file_url);
  return initiated.body.file_url;
}

async function collect() {
  const body = { prompt: $("prompt").value };
  for (const [name, field] of state.fields) {
    const element = field.element;
    if (field.kind === "prompt") continue;
    if (field.kind === "image") {
      const typed = field.urls.value.split(/\s+/).filter(Boolean);
      const files = state.files.get(name) || [];
      if (files.length) setStatus(`Uploading ${files.length} file${files.length > 1 ? "s" : ""}…`);
      const uploaded = [];
      for (const file of files) uploaded.push(await upload(name, file));
      const all = [...uploaded, ...typed];
      if (field.multiple && all.length) body[name] = all;
      else if (all.length) body[name] = all[0];
      continue;
    }
    let value;
    if (field.kind === "enum") {
      if (element.value === "") continue;
      value = field.values[Number(element.value)];
    } else if (field.kind === "boolean") {
      value = element.checked;
    } else if (field.kind === "integer" || field.kind === "number") {
      if (element.value.trim() === "") continue;
      value = Number(element.value);
      if (!Number.isFinite(value)) throw new FieldError(name, "Not a number");
    } else if (field.kind === "string") {
      if (element.value === "" && field.default === undefined) continue;
      value = element.value;
    } else {
      if (element.value.trim() === "") continue;
      try {
        value = JSON.parse(element.value);
      } catch (error) {
        throw new FieldError(name, `Not valid JSON: ${error.message}`);
      }
    }
    // Defaults are left to the server, so that a request says only what it asks for.
    if (JSON.stringify(value) === JSON.stringify(field.default)) continue;
    body[name] = value;
  }
  return body;
}

function clearErrors() {
  showFormError("");
  for (const node of document.querySelectorAll(".error[id$='-error']")) {
    node.textContent = "";
    node.hidden = true;
  }
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

function markField(name, message) {
  const control = name === "prompt" ? $("prompt") : $(`field-${name}`);
  const error = name === "prompt" ? $("prompt-error") : $(`field-${name}-error`);
  if (!control || !error) return false;
  control.setAttribute("aria-invalid", "true");
  error.textContent = error.textContent ? `${error.textContent}; ${message}` : message;
  error.hidden = false;
  if (control.closest("details")) control.closest("details").open = true;
  return control;
}

function showValidation(response) {
  const detail = response.body && response.body.detail;
  const problems = Array.isArray(detail) ? detail : [{ loc: ["body"], msg: describeError(response) }];
  let first = null;
  for (const problem of problems) {
    const loc = Array.isArray(problem.loc) ? problem.loc : [];
    const name = loc[0] === "body" ? loc[1] : undefined;
    const marked = typeof name === "string" ? markField(name, problem.msg) : false;
    first = first || marked;
  }
  const summary = `Not accepted: ${describeError({ status: response.status, body: { detail: problems } })}`;
  showFormError(summary);
  if (first) first.focus();
  return summary;
}

function setRunning(running) {
  const button = $("generate");
  button.setAttribute("aria-disabled", running ? "true" : "false");
  button.textContent = running ? "Generating…" : "Generate";
  $("cancel").hidden = !running;
  document.body.classList.toggle("running", running);
}

function resetProgress() {
  $("progress").max = 1;
  $("progress").value = 0;
  $("progress-text").textContent = "";
  $("logs").replaceChildren();
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  state.logKeys = new Set();
}

async function generate() {
  if (state.running) return;
  if (!state.schema) {
    await loadEndpoints();
    if (!state.schema) return;
  }
  clearErrors();
  resetProgress();
  const appId = $("endpoint").value;
  setRunning(true);
  state.running = { controller: new AbortController() };
  const started = performance.now();
  try {
    let body;
    try {
      body = await collect();
    } catch (error) {
      if (!(error instanceof FieldError)) throw error;
      markField(error.field, error.message);
      showFormError(`${error.field}: ${error.message}`);
      setStatus("Not sent: see the form.");
      return;
    }
    setStatus("Submitting…");
    const submitted = await api(`/${appId}`, { method: "POST", json: body });
    if (submitted.status === 422 || submitted.status === 400) {
      setStatus(showValidation(submitted));
      return;
    }
    if (!submitted.ok) {
      showFormError(describeError(submitted));
      setStatus(`Refused: HTTP ${submitted.status}.`);
      return;
    }
    const job = submitted.body;
    state.running.job = job;
    const entry = {
      request_id: job.request_id,
      app_id: appId,
      prompt: body.prompt.slice(0, PROMPT_KEPT),
      created: new Date().toISOString(),
      status: "IN_QUEUE",
      response_url: job.response_url,
      images: [],
    };
    remember(entry);
    onStatus({ status: job.status || "IN_QUEUE", queue_position: job.queue_position });
    await follow(job, state.running.controller.signal);
    const result = await api(local(job.response_url));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if (!result.ok) {
      const reason = describeError(result);
      entry.status = "FAILED";
      entry.error = reason;
      remember(entry);
      showFormError(`The request failed: ${reason}`);
      setStatus(`Failed after ${seconds} s: ${reason}`);
      return;
    }
    const images = result.body.images || [];
    entry.status = "COMPLETED";
    entry.seed = result.body.seed;
    entry.images = images.map((image) => ({
      url: image.url.startsWith("data:") ? null : image.url,
      width: image.width,
      height: image.height,
    }));
    remember(entry);
    $("progress").value = $("progress").max;
    showResults(result.body, entry);
    setStatus(`Completed: ${images.length} image${images.length === 1 ? "" : "s"} in ${seconds} s.`);
  } catch (error) {
    if (error.name === "AbortError") setStatus("Stopped following the request.");
    else {
      showFormError(`Error: ${error.message}`);
      setStatus(`Error: ${error.message}`);
    }
  } finally {
    state.running = null;
    setRunning(false);
  }
}

// The status stream, read as server-sent events; a stream that ends early is followed by polling.
async function follow(job, signal) {
  const address = new URL(job.status_url, location.href);
  address.pathname += "/stream";
  address.searchParams.set("logs", "1");
  address.searchParams.set("previews", "1"); // live previews while the local model runs
  const response = await fetch(address.pathname + address.search, {
    headers: authHeaders({ Accept: "text/event-stream" }),
    signal,
  });
  if (response.ok && response.body) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue; // a comment (": ping") or an event without data
        let event;
        try {
          event = JSON.parse(data);
        } catch {
          continue;
        }
        onStatus(event);
        if (event.status === "COMPLETED") {
          reader.cancel().catch(() => {});
          return event;
        }
      }
    }
  }
  for (;;) {
    const polled = await api(`${local(job.status_url)}${job.status_url.includes("?") ? "&" : "?"}logs=1`, {
      signal,
    });
    if (polled.ok && polled.body) {
      onStatus(polled.body);
      if (polled.body.status === "COMPLETED") return polled.body;
    } else if (polled.status !== 202) {
      throw new Error(describeError(polled));
    }
    await new Promise((done) => setTimeout(done, 500));
  }
}

function onStatus(event) {
  const progress = $("progress");
  for (const line of event.logs || []) {
    const key = `${line.timestamp || ""} ${line.message}`;
    if (state.logKeys.has(key)) continue;
    state.logKeys.add(key);
    $("logs").append(el("li", { text: line.message }));
    const step = STEP.exec(line.message || "");
    if (step && /step/i.test(line.message)) {
      progress.max = Number(step[2]);
      progress.value = Number(step[1]);
      $("progress-text").textContent = `${step[1]}/${step[2]}`;
    }
  }
  const logs = $("logs");
  logs.scrollTop = logs.scrollHeight;
  // A status event may carry a live preview (a data: URI image); shown when it does.
  if (typeof event.preview === "string" && event.preview.startsWith("data:image/")) {
    $("preview").src = event.preview;
    $("preview").hidden = false;
  }
  if (event.status === "IN_QUEUE") {
    const position = event.queue_position;
    setStatus(
      typeof position === "number" ? `In queue: ${position === 0 ? "next" : `position ${position + 1}`}.` : "In queue.",
    );
  } else if (event.status === "IN_PROGRESS") {
    const text = "Generating…";
    if ($("status").textContent !== text) setStatus(text);
  } else if (event.status === "COMPLETED") {
    setStatus(event.error ? `Finished with an error: ${event.error}` : "Completed: fetching the result…");
  }
}

async function cancel() {
  const job = state.running && state.running.job;
  if (!job) return;
  setStatus("Cancelling…");
  const answer = await api(local(job.cancel_url), { method: "PUT" });
  if (!answer.ok) setStatus(`Cannot cancel: ${describeError(answer)}`);
}

// -- results and history ------------------------------------------------------------------------------

function extension(image) {
  const type = image.content_type || "";
  if (type.includes("png")) return "png";
  if (type.includes("webp")) return "webp";
  return "jpg";
}

function showResults(output, entry) {
  const gallery = $("gallery");
  const images = output.images || [];
  const items = images.map((image, index) => {
    const label = `Image ${index + 1} of ${images.length}: ${entry.prompt}`;
    const flagged = Array.isArray(output.has_nsfw_concepts) && output.has_nsfw_concepts[index];
    return el(
      "li",
      {},
      el(
        "figure",
        {},
        el("img", { src: image.url, alt: label, width: image.width, height: image.height, loading: "lazy" }),
        el("figcaption", {
          text:
            `${image.width}×${image.height}` +
            (output.seed !== undefined ? ` · seed ${output.seed}` : "") +
            (flagged ? " · flagged by the safety checker" : ""),
        }),
        el(
          "div",
          { class: "actions" },
          el("a", {
            class: "button secondary small",
            href: image.url,
            download: `kontextd-${entry.request_id}-${index + 1}.${extension(image)}`,
            text: "Download",
          }),
          el("button", {
            type: "button",
            class: "secondary small",
            text: "Copy URL",
            onclick: () => copy(image.url),
          }),
          output.seed === undefined
            ? null
            : el("button", {
                type: "button",
                class: "secondary small",
                text: "Reuse seed",
                onclick: () => reuseSeed(output.seed),
              }),
        ),
      ),
    );
  });
  gallery.prepend(...items);
  while (gallery.children.length > GALLERY_LIMIT) gallery.lastElementChild.remove();
  $("results-empty").hidden = gallery.children.length > 0;
}

async function copy(url) {
  try {
    await navigator.clipboard.writeText(url);
    setStatus("URL copied.");
  } catch {
    setStatus(`Copy this URL: ${url}`);
  }
}

function reuseSeed(seed) {
  const field = state.fields.get("seed");
  if (!field) {
    setStatus("This endpoint takes no seed.");
    return;
  }
  $("options").open = true;
  field.element.value = String(seed);
  field.touched = true;
  field.element.focus();
  setStatus(`Seed ${seed} set.`);
}

function history() {
  const entries = load(STORE.history, []);
  return Array.isArray(entries) ? entries : [];
}

function remember(entry) {
  const entries = history().filter((item) => item.request_id !== entry.request_id);
  entries.unshift(entry);
  save(STORE.history, entries.slice(0, HISTORY_LIMIT));
  renderHistory();
}

function renderHistory() {
  const entries = history();
  $("history-empty").hidden = entries.length > 0;
  $("clear-history").hidden = entries.length === 0;
  $("history").replaceChildren(
    ...entries.map((entry) => {
      const thumb = (entry.images || []).find((image) => image.url);
      const when = new Date(entry.created);
      return el(
        "li",
        { "data-request-id": entry.request_id },
        thumb
          ? el("img", { src: thumb.url, alt: "", width: 48, height: 48, loading: "lazy" })
          : el("span", { class: "thumb-empty", "aria-hidden": "true" }),
        el(
          "div",
          { class: "entry" },
          el("span", { class: "prompt", text: entry.prompt }),
          el("span", {
            class: "muted",
            text:
              `${entry.app_id} · ${Number.isNaN(when.getTime()) ? "" : when.toLocaleString()} · ` +
              `${entry.status.toLowerCase()}${entry.seed !== undefined ? ` · seed ${entry.seed}` : ""}` +
              (entry.error ? ` · ${entry.error}` : ""),
          }),
          el("code", { class: "muted", text: entry.request_id }),
        ),
        el("button", {
          type: "button",
          class: "secondary small",
          text: "Reuse",
          "aria-label": `Reuse the prompt and seed of: ${entry.prompt}`,
          onclick: () => reuse(entry),
        }),
      );
    }),
  );
}

function reuse(entry) {
  const select = $("endpoint");
  if ([...select.options].some((option) => option.value === entry.app_id) && select.value !== entry.app_id) {
    select.value = entry.app_id;
    renderFields();
  }
  $("prompt").value = entry.prompt;
  if (entry.seed !== undefined) reuseSeed(entry.seed);
  $("prompt").focus();
}

// -- wiring -------------------------------------------------------------------------------------------

function start() {
  const key = $("api-key");
  key.value = load(STORE.key, "");
  key.addEventListener("input", () => save(STORE.key, key.value));
  key.addEventListener("change", () => {
    if (state.needsKey || !state.schema) loadEndpoints();
  });
  $("endpoint").addEventListener("change", renderFields);
  const form = $("run-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  $("cancel").addEventListener("click", cancel);
  $("clear-history").addEventListener("click", () => {
    save(STORE.history, []);
    renderHistory();
    $("prompt").focus();
  });
  renderHistory();
  loadEndpoints();
}

start();
