// The playground: builds a request from the form, submits it, follows the job's event stream
// (status, progress, previews) and shows the results; the history reloads earlier jobs. Every
// rule about what a request may hold stays in the API: the form sends what the user set and
// shows the API's sentence next to the field it names.

import { ApiError, call, followEvents, saveKey, savedKey } from "./api.js";
import { drawEdges } from "./edges.js";
import { MaskPainter } from "./masks.js";

const $ = (id) => document.getElementById(id);
const form = $("job-form");
const state = {
  models: [],
  job: null,
  abort: null,
  photo: null,
  loading: new Set(), // preview images being loaded
  sentMasks: [], // the drawn masks of the request being submitted
  masksByJob: new Map(), // job id -> the drawn masks it was sent
  // The stored inputs of a job reloaded from the history, sent again by their keys
  // (inputs/<sha256>.<ext>) until the user picks or draws new ones: the job object keeps keys,
  // not bytes, and the API takes a key back as a reference.
  reused: { image: null, regions: null, conditionImages: null, frames: null },
};

// The page's own words for a missing or refused key (the API's sentence is written for curl).
const NO_KEY = "Enter your API key above to run jobs; make up prints one.";
const BAD_KEY = "The gateway does not accept this API key; check it above, or use the one make up printed.";
const painter = new MaskPainter($("mask-canvas"), $("mask-backdrop"));
// The API's limit on the LoRA adapters of one job (masactrl_jobs.schema.MAX_LORAS; a test holds
// the two equal): ticking stops there instead of sending a request the API refuses.
const MAX_LORAS = 4;

// -- small helpers ---------------------------------------------------------------------------

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function numberOrUndefined(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

function mode() {
  return $("mode").value;
}

function selectedModel() {
  return state.models.find((model) => model.name === $("model").value);
}

// -- targets ---------------------------------------------------------------------------------

function renumberTargets() {
  [...$("targets").children].forEach((row, index) => {
    row.dataset.field = `target_prompts.${index}`;
    row.querySelector("input").setAttribute("aria-label", `Target prompt ${index + 1}`);
    row.querySelector("button").setAttribute("aria-label", `Remove target ${index + 1}`);
    row.querySelector("button").disabled = $("targets").children.length === 1;
  });
}

function addTarget(value = "") {
  const input = element("input", { type: "text", "data-testid": "target-prompt" });
  input.value = value;
  const remove = element("button", { type: "button", class: "secondary", text: "Remove" });
  const row = element("li", { class: "field" }, input, remove);
  remove.addEventListener("click", () => {
    row.remove();
    renumberTargets();
  });
  $("targets").append(row);
  renumberTargets();
  return input;
}

function setTargets(prompts) {
  $("targets").replaceChildren();
  for (const prompt of prompts.length ? prompts : [""]) addTarget(prompt);
}

function targetPrompts() {
  return [...$("targets").querySelectorAll("input")].map((input) => input.value);
}

// -- LoRA adapters ---------------------------------------------------------------------------

function loraRows() {
  return [...$("loras").children];
}

function loraRow(lora) {
  const name = lora.name;
  const tick = element("input", { type: "checkbox", "data-testid": `lora-option-${name}` });
  const weight = element("input", {
    type: "number",
    step: "0.05",
    "data-testid": `lora-weight-${name}`,
    "aria-label": `Weight of ${name}`,
  });
  const row = element("li", { "data-lora": name, "data-default": String(lora.weight ?? 1) });
  weight.value = row.dataset.default;
  tick.addEventListener("change", limitLoras);
  row.append(element("label", { class: "check" }, tick, name), weight);
  return row;
}

/** Tick the adapters named in ``loras`` (``[{name, weight}]``) with their weights; untick the
 * others, back at their default weights. Names the model does not list are left out. */
function setLoras(loras) {
  const wanted = new Map(loras.map((lora) => [lora.name, lora.weight]));
  for (const row of loraRows()) {
    const weight = wanted.get(row.dataset.lora);
    row.querySelector("input[type=checkbox]").checked = wanted.has(row.dataset.lora);
    row.querySelector("input[type=number]").value =
      weight === undefined || weight === null ? row.dataset.default : String(weight);
  }
  limitLoras();
}

function limitLoras() {
  const ticks = loraRows().map((row) => row.querySelector("input[type=checkbox]"));
  const full = ticks.filter((tick) => tick.checked).length >= MAX_LORAS;
  for (const tick of ticks) tick.disabled = full && !tick.checked;
  const hint = ticks.length
    ? `Tick up to ${MAX_LORAS}; each weight scales its adapter (shown: the model's default).`
    : "This model has no LoRA adapters.";
  $("lora-hint").textContent = full ? `${hint} ${MAX_LORAS} are ticked, the most a job takes.` : hint;
}

/** List ``model``'s adapters, keeping the ticks and weights of those it shares with the last. */
function fillLoras(model) {
  const list = $("loras");
  if (list.dataset.model === model.name) return;
  const kept = lorasBody();
  list.dataset.model = model.name;
  list.replaceChildren(...model.loras.map(loraRow));
  setLoras(kept);
}

/** The ticked adapters as the API takes them; each row sent is named by its index in the list,
 * so that an error at ``loras.<i>`` shows next to it. */
function lorasBody() {
  const loras = [];
  for (const row of loraRows()) {
    delete row.dataset.field;
    if (!row.querySelector("input[type=checkbox]").checked) continue;
    row.dataset.field = `loras.${loras.length}`;
    loras.push({ name: row.dataset.lora, weight: numberOrUndefined(row.querySelector("input[type=number]")) });
  }
  return loras;
}

// -- models and the control sliders ----------------------------------------------------------

function syncSliders() {
  const steps = Math.max(1, Number($("steps").value) || 1);
  // The control starts at a step before the last (the range clamps the value to it).
  $("start-step").max = String(steps - 1);
  $("start-step-value").textContent = `${$("start-step").value} of ${steps}`;
  $("start-layer-value").textContent = `${$("start-layer").value} of ${Number($("start-layer").max) + 1} blocks`;
}

function applyModel() {
  const model = selectedModel();
  if (!model) return;
  $("start-layer").max = String(model.block_count - 1);
  $("start-layer").value = String(model.default_control.start_layer);
  $("start-step").value = String(model.default_control.start_step);
  $("model-info").textContent =
    `${model.family}, ${model.native_width}×${model.native_height}, ${model.block_count} blocks; ` +
    (model.live ? "a worker is live" : "no live worker: jobs wait in the queue") +
    (model.preview_decoder === "vae" ? "; previews decoded by its VAE, less often." : ".");
  const conditions = $("condition-model");
  const chosen = conditions.value;
  conditions.replaceChildren(element("option", { value: "", text: "none" }));
  for (const condition of model.conditions) {
    conditions.append(element("option", { value: condition.name, text: `${condition.name} (${condition.kind})` }));
  }
  if (model.conditions.some((c) => c.name === chosen)) conditions.value = chosen;
  $("condition-fields").hidden = !conditions.value;
  applyFeatures(model);
  fillLoras(model);
  if (!state.photo) painter.resize(model.native_width, model.native_height);
  syncSliders();
}

/** Disable what the model's family does not offer (GET /v1/models: features), each with the
 * sentence why: layout conditions and sequences on SD3 and FLUX.1, a negative prompt on
 * guidance-distilled FLUX.1. */
function applyFeatures(model) {
  const features = model.features;
  const why = `${model.name} is a ${model.family} model, and ${features.unavailable}.`;
  const sequence = $("mode").querySelector("option[value=sequence]");
  sequence.disabled = !features.sequences;
  if (!features.sequences && mode() === "sequence") {
    $("mode").value = "synthesis";
    document.body.dataset.mode = mode();
  }
  showUnavailable("mode-unavailable", !features.sequences, `Sequences are off: ${why}`);
  const conditions = $("condition-model");
  conditions.disabled = !features.layout_conditions;
  if (!features.layout_conditions) {
    conditions.value = "";
    $("condition-fields").hidden = true;
  }
  showUnavailable("condition-unavailable", !features.layout_conditions, `Layout conditions are off: ${why}`);
  const automatic = $("mask-mode").querySelector("option[value=auto]");
  automatic.disabled = !features.automatic_masks;
  if (!features.automatic_masks && $("mask-mode").value === "auto") {
    $("mask-mode").value = "none";
    $("mask-mode").dispatchEvent(new Event("change"));
  }
  showUnavailable(
    "mask-auto-unavailable",
    !features.automatic_masks,
    `Automatic masks are off: ${model.name} has no cross-attention to read a word's map from; draw the regions.`,
  );
  const negative = $("negative-prompt");
  negative.disabled = !features.negative_prompt;
  if (!features.negative_prompt) negative.value = "";
  showUnavailable(
    "negative-prompt-unavailable",
    !features.negative_prompt,
    `${model.name} is guidance-distilled: guidance is an input of the model, so a negative prompt has no effect.`,
  );
}

function showUnavailable(id, shown, sentence) {
  $(id).hidden = !shown;
  $(id).textContent = shown ? sentence : "";
}

/** A sequence follows condition frames: with a model that has no condition model, the sentence
 * that names one that has (instead of the API's "condition.model" error); else null. */
function conditionModelSuggestion() {
  const model = selectedModel();
  if (mode() !== "sequence" || !model || model.conditions.length) return null;
  const other = state.models.find((m) => m.conditions.length);
  return (
    `A sequence follows condition frames, and ${model.name} has no condition model: ` +
    (other
      ? `choose ${other.name} above (condition models: ${other.conditions.map((c) => c.name).join(", ")}).`
      : "no model of this gateway has one.")
  );
}

async function loadModels() {
  if (!savedKey()) {
    $("model-info").textContent = "Enter your API key above to list the models.";
    return;
  }
  try {
    const list = await call("/v1/models");
    state.models = list.data;
    const select = $("model");
    const chosen = select.value || list.default;
    select.replaceChildren(
      ...list.data.map((model) =>
        element("option", { value: model.name, text: `${model.name}${model.live ? " · live" : ""}` }),
      ),
    );
    select.value = list.data.some((m) => m.name === chosen) ? chosen : list.default;
    applyModel();
  } catch (error) {
    showErrors(error);
  }
}

// -- errors next to their fields -------------------------------------------------------------

// Multipart part names the page sends, and the fields they stand for.
const PART_FIELDS = { frame: "condition.frames", video: "condition.video" };

function clearErrors() {
  for (const node of document.querySelectorAll(".error")) node.remove();
  for (const node of document.querySelectorAll(".field.invalid")) node.classList.remove("invalid");
}

function fieldFor(loc) {
  let path = loc.map(String);
  while (path.length && ["body", "params", "query"].includes(path[0])) path = path.slice(1);
  if (path.length && PART_FIELDS[path[0]]) path = PART_FIELDS[path[0]].split(".");
  for (let length = path.length; length > 0; length -= 1) {
    const key = path.slice(0, length).join(".");
    const field = form.querySelector(`[data-field="${CSS.escape(key)}"]`);
    if (field && field.offsetParent !== null) return field;
  }
  return null;
}

function errorNode(message, testid) {
  return element("p", { class: "error", role: "alert", "data-testid": testid, text: message });
}

function placeError(field, node) {
  if (field) {
    field.classList.add("invalid");
    field.append(node);
  } else {
    $("form-error").append(node);
  }
}

/** The API's sentence next to the first field it names; other problems next to theirs. */
function showErrors(error) {
  clearErrors();
  let message = error instanceof ApiError ? error.message : `The gateway cannot be reached (${error.message}).`;
  if (error instanceof ApiError && error.status === 401) message = savedKey() ? BAD_KEY : NO_KEY;
  const details = error instanceof ApiError ? error.details : [];
  const first = details.length ? fieldFor(details[0].loc) : error.status === 401 ? $("api-key").closest(".field") : null;
  placeError(first, errorNode(message, "error"));
  for (const detail of details.slice(1)) {
    placeError(fieldFor(detail.loc), errorNode(detail.message, "field-error"));
  }
  (first ? first.querySelector("input, select") : null)?.focus();
}

// -- building the request --------------------------------------------------------------------

async function controlBody() {
  const control = { start_step: Number($("start-step").value), start_layer: Number($("start-layer").value) };
  const maskMode = $("mask-mode").value;
  if (maskMode === "manual" && mode() !== "sequence") {
    if (state.reused.regions) {
      control.mask = { mode: "manual", regions: state.reused.regions };
    } else {
      control.mask = { mode: "manual", regions: painter.payload() };
      state.sentMasks = control.mask.regions;
    }
  } else if (maskMode === "auto" && mode() !== "sequence") {
    control.mask = {
      mode: "auto",
      source_word: $("mask-source-word").value,
      target_word: $("mask-target-word").value,
    };
  }
  return control;
}

function conditionWindow() {
  return {
    model: $("condition-model").value,
    preprocess: $("condition-preprocess").value,
    scale: Number($("condition-scale").value),
    start: Number($("condition-start").value),
    end: Number($("condition-end").value),
  };
}

async function requestBody() {
  state.sentMasks = [];
  const body = {
    model: $("model").value || undefined,
    source_prompt: $("source-prompt").value,
    target_prompts: targetPrompts(),
    negative_prompt: $("negative-prompt").value,
    seed: numberOrUndefined($("seed")),
    steps: numberOrUndefined($("steps")),
    guidance_scale: numberOrUndefined($("guidance")),
    control: await controlBody(),
  };
  // Opt-in, and only sent when asked for, so the page also works with a gateway without it.
  if ($("previews").checked) body.previews = true;
  const priority = numberOrUndefined($("priority"));
  if (priority) body.priority = priority;
  // datetime-local is the browser's local time: sent as an RFC 3339 time with its offset.
  if ($("start-by").value) body.start_by = new Date($("start-by").value).toISOString();
  const loras = lorasBody();
  if (loras.length) body.loras = loras;
  if (mode() !== "synthesis" && $("anchor-source").checked) body.anchor_source = true;
  if ($("condition-model").value && mode() !== "sequence") {
    const file = $("condition-image").files[0];
    const images = file ? [await readDataUrl(file)] : state.reused.conditionImages || [];
    body.condition = { ...conditionWindow(), images };
  }
  return body;
}

async function submitJob() {
  const body = await requestBody();
  if (mode() === "synthesis") return call("/v1/syntheses", { method: "POST", json: body });
  if (mode() === "edit") {
    const file = $("image-input").files[0];
    if (file) body.image = await readDataUrl(file);
    else if (state.reused.image) body.image = state.reused.image;
    return call("/v1/edits", { method: "POST", json: body });
  }
  // Sequences go as multipart: the frames or the video are files, the rest is the params part.
  body.fps = numberOrUndefined($("fps"));
  body.condition = conditionWindow();
  const newLayouts = $("frames-input").files.length || $("video-input").files.length;
  if (!newLayouts && state.reused.frames) body.condition.frames = state.reused.frames;
  if (!$("image-input").files.length && state.reused.image) body.image = state.reused.image;
  const parts = new FormData();
  parts.append("params", new Blob([JSON.stringify(body)], { type: "application/json" }));
  for (const frame of $("frames-input").files) parts.append("frame", frame, frame.name);
  const video = $("video-input").files[0];
  if (video) parts.append("video", video, video.name);
  const photo = $("image-input").files[0];
  if (photo) parts.append("image", photo, photo.name);
  return call("/v1/sequences", { method: "POST", form: parts });
}

// -- the job: status, progress, previews, results --------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function describe(job) {
  if (job.status === "queued") {
    return job.queue_position === null || job.queue_position === undefined
      ? "Queued."
      : `Queued, position ${job.queue_position} in line.`;
  }
  if (job.status === "running") return "Running.";
  if (job.status === "failed") return `Failed: ${job.error ? job.error.message : "no reason given"}`;
  if (job.status === "expired") return "Expired: no worker started it by its deadline.";
  return job.status === "succeeded" ? "Succeeded." : "Canceled.";
}

const ENDED = ["succeeded", "failed", "canceled", "expired"];
// The statuses a job can be retried from (POST /v1/jobs/{id}/retry).
const RETRYABLE = ["failed", "canceled", "expired"];

function showProgress(progress) {
  const bar = $("progress");
  bar.value = progress.fraction;
  bar.setAttribute("aria-valuetext", `${progress.phase} step ${progress.step} of ${progress.total}`);
  const frames = progress.frames_done ? `, ${progress.frames_done} frames decoded` : "";
  setStatus(`Running: ${progress.phase === "invert" ? "inverting the photo" : "denoising"}, step ${progress.step} of ${progress.total}${frames}.`);
}

function showPreviews(preview) {
  const box = $("previews-box");
  const step = preview.step;
  for (const image of preview.images) {
    const id = `preview-${image.role}-${image.index}`;
    let figure = document.getElementById(id);
    if (!figure) {
      figure = element(
        "figure",
        { id },
        element("img", { "data-testid": "preview-image", alt: `Live preview of ${image.role} ${image.index}` }),
        element("figcaption"),
      );
      box.append(figure);
    }
    // Loaded aside and shown once complete, so a slow load never blanks the previous preview
    // and an older one that arrives late never replaces a newer one.
    figure.dataset.latest = String(step);
    const next = new Image();
    state.loading.add(next);
    next.onload = () => {
      state.loading.delete(next);
      if (figure.isConnected && figure.dataset.latest === String(step)) {
        figure.querySelector("img").src = image.url;
        figure.querySelector("figcaption").textContent = `${image.role} ${image.index} · step ${step} of ${preview.steps}`;
      }
    };
    next.src = image.url;
  }
}

function showResults(job) {
  const results = $("results");
  results.replaceChildren();
  const seen = {};
  for (const image of job.output ? job.output.images : []) {
    const index = (seen[image.role] = (seen[image.role] ?? -1) + 1);
    const label = `${image.role} ${index}${image.prompt ? ` — ${image.prompt}` : ""}`;
    // The animation plays by itself, muted and looping like its WebP twin, at the images' size.
    const media = image.key.endsWith(".mp4")
      ? element("video", {
          src: image.url,
          controls: "",
          muted: "",
          loop: "",
          autoplay: "",
          playsinline: "",
          "aria-label": label,
          "data-testid": "result-video",
        })
      : element("img", { src: image.url, alt: label, "data-testid": "result-image" });
    if (media.tagName === "VIDEO") media.muted = true;
    const download = element("a", { href: image.url, download: image.key.split("/").pop(), text: "download" });
    results.append(element("figure", {}, media, element("figcaption", {}, `${label} · `, download)));
  }
  (state.masksByJob.get(job.id) || []).forEach((region, index) => {
    for (const side of ["source", "target"]) {
      const label = `${side} mask, region ${index + 1}`;
      const mask = element("img", { src: region[side], alt: label, class: "mask" });
      results.append(element("figure", {}, mask, element("figcaption", { text: label })));
    }
  });
  const input = job.input;
  const metrics = job.metrics || {};
  const seconds = (value) => (typeof value === "number" ? `${value.toFixed(1)} s` : "–");
  $("metrics").textContent =
    `seed ${input.seed} · ${input.steps} steps · start step ${input.control.start_step}, ` +
    `layer ${input.control.start_layer} · ${input.width}×${input.height} · ` +
    `queued ${seconds(metrics.queue_seconds)}, denoised ${seconds(metrics.denoise_seconds)}, ` +
    `total ${seconds(metrics.total_seconds)}`;
  $("details").hidden = false;
  $("job-json").textContent = JSON.stringify(
    { id: job.id, kind: job.kind, model: job.model, status: job.status, input: job.input, metrics: job.metrics },
    (key, value) => (typeof value === "string" && value.startsWith("data:") ? `${value.slice(0, 32)}…` : value),
    2,
  );
}

function finish(job) {
  state.job = job;
  setStatus(describe(job));
  if (job.status === "succeeded") {
    $("progress").value = 1;
    // The results replace the previews (the worker deletes them once a job succeeded), and
    // loads still under way are dropped rather than answered 404.
    $("previews-box").replaceChildren();
    for (const image of state.loading) image.removeAttribute("src");
    state.loading.clear();
  }
  $("cancel").disabled = true;
  $("retry").hidden = !RETRYABLE.includes(job.status) || Boolean(job.retried_by);
  $("submit").disabled = false;
  // Sentences about the input the worker wrote (e.g. prompt words the model does not know).
  $("job-warnings").replaceChildren(...(job.warnings || []).map((text) => element("li", { text })));
  $("job-warnings").hidden = !(job.warnings || []).length;
  showResults(job);
  loadHistory();
}

async function follow(job) {
  if (state.abort) state.abort.abort();
  const abort = (state.abort = new AbortController());
  state.job = job;
  $("previews-box").replaceChildren();
  $("results").replaceChildren();
  $("metrics").textContent = "";
  $("job-warnings").hidden = true;
  $("details").hidden = true;
  $("progress").value = 0;
  setStatus(describe(job));
  $("cancel").disabled = job.status !== "queued" && job.status !== "running";
  $("retry").hidden = true;
  if (ENDED.includes(job.status)) return finish(job);
  // A running job reloaded from the history shows its latest preview until the next arrives.
  if (job.preview) showPreviews(job.preview);
  $("submit").disabled = true;
  const poll = setInterval(async () => {
    // The stream says nothing while a job waits; its place in line comes from the job itself.
    if (state.job && state.job.id === job.id && state.job.status === "queued") {
      try {
        const now = await call(`/v1/jobs/${job.id}`, { signal: abort.signal });
        if (now.status === "queued") setStatus(describe(now));
      } catch {
        // the next poll, or the stream, will tell
      }
    }
  }, 1500);
  try {
    await followEvents(
      job.id,
      ({ event, data }) => {
        if (event === "status") {
          state.job = { ...state.job, status: data.status };
          setStatus(describe(state.job));
          loadHistory();
        } else if (event === "progress") {
          state.job = { ...state.job, status: "running" };
          showProgress(data);
        } else if (event === "preview") {
          showPreviews(data);
        } else if (ENDED.includes(event)) {
          finish(data);
        }
      },
      { signal: abort.signal },
    );
  } catch (error) {
    showErrors(error);
    $("submit").disabled = false;
  } finally {
    clearInterval(poll);
  }
}

/** Bring the job panel into view: after Run, the form is scrolled down to its button. */
function showJobPanel() {
  const still = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  $("job-panel").scrollIntoView({ behavior: still ? "auto" : "smooth", block: "start" });
}

async function cancelJob() {
  if (!state.job) return;
  $("cancel").disabled = true;
  try {
    const job = await call(`/v1/jobs/${state.job.id}/cancel`, { method: "POST" });
    setStatus(job.status === "canceled" ? "Canceled." : "Canceling: the job stops at its next step.");
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 409)) showErrors(error);
  }
}

/** Run the shown job again: a new job with its parameters and inputs, followed here. */
async function retryJob() {
  if (!state.job) return;
  $("retry").hidden = true;
  clearErrors();
  try {
    const job = await call(`/v1/jobs/${state.job.id}/retry`, { method: "POST" });
    await follow(job);
  } catch (error) {
    showErrors(error);
  }
}

// -- history ---------------------------------------------------------------------------------

function fillForm(job) {
  const input = job.input;
  $("mode").value = job.kind;
  document.body.dataset.mode = job.kind;
  if (state.models.some((m) => m.name === job.model)) {
    $("model").value = job.model;
    applyModel();
  }
  $("source-prompt").value = input.source_prompt;
  setTargets(input.target_prompts);
  $("negative-prompt").value = input.negative_prompt || "";
  $("seed").value = String(input.seed);
  $("steps").value = String(input.steps);
  $("guidance").value = String(input.guidance_scale);
  $("start-step").value = String(input.control.start_step);
  $("start-layer").value = String(input.control.start_layer);
  $("anchor-source").checked = Boolean(input.anchor_source);
  $("previews").checked = Boolean(input.previews);
  $("priority").value = String(job.priority || 0);
  setLoras(input.loras || []);
  reuseInputs(input, job.kind);
  syncSliders();
}

/** Put a reloaded job's stored inputs back in the form, as the keys the API takes back. */
function reuseInputs(input, kind) {
  for (const id of ["image-input", "condition-image", "frames-input", "video-input"]) $(id).value = "";
  showPhoto(null);
  const mask = input.control.mask || { mode: "none" };
  const condition = input.condition;
  state.reused = {
    image: input.image || null,
    regions: mask.mode === "manual" && mask.regions ? mask.regions : null,
    conditionImages: kind !== "sequence" && condition && condition.images.length ? condition.images : null,
    frames: kind === "sequence" && condition && condition.images.length ? condition.images : null,
  };
  $("mask-mode").value = mask.mode;
  $("mask-mode").dispatchEvent(new Event("change"));
  $("mask-source-word").value = mask.source_word || "";
  $("mask-target-word").value = mask.target_word || "";
  if (condition && [...$("condition-model").options].some((o) => o.value === condition.model)) {
    $("condition-model").value = condition.model;
    $("condition-preprocess").value = condition.preprocess;
    $("condition-scale").value = String(condition.scale);
    $("condition-start").value = String(condition.start);
    $("condition-end").value = String(condition.end);
  } else {
    $("condition-model").value = "";
  }
  $("condition-fields").hidden = !$("condition-model").value;
  showReused();
}

/** Say which inputs come from the reloaded job, beside the fields they replace. */
function showReused() {
  const notes = [
    ["drop-zone", state.reused.image, "reused-photo", "Using the photo of the job reloaded from the history; choose a file to replace it."],
    ["mask-manual", state.reused.regions, "reused-masks", "Using the drawn regions of the job reloaded from the history; drawing or Clear replaces them."],
  ];
  for (const [id, reused, testid, text] of notes) {
    $(id).querySelector(`[data-testid=${testid}]`)?.remove();
    if (reused) $(id).append(element("p", { class: "hint", "data-testid": testid, text }));
  }
}

function forget(what) {
  if (!state.reused[what]) return;
  state.reused[what] = null;
  showReused();
}

async function loadHistory() {
  if (!savedKey()) return;
  try {
    const page = await call("/v1/jobs?limit=20");
    $("history").replaceChildren(
      ...page.data.map((job) => {
        const when = new Date(job.created_at).toLocaleTimeString();
        const what = job.input.target_prompts[0] || job.input.source_prompt;
        const button = element("button", {
          type: "button",
          class: "secondary",
          "data-testid": "history-item",
          "data-job-id": job.id,
          text: `${when} · ${job.kind} · ${job.status} · ${what}`,
        });
        button.addEventListener("click", () => {
          clearErrors();
          fillForm(job);
          follow(job);
        });
        return element("li", {}, button);
      }),
    );
  } catch (error) {
    showErrors(error);
  }
}

// -- inputs: photo, layout image -------------------------------------------------------------

async function showPhoto(file) {
  const zone = $("drop-zone");
  zone.querySelector("img")?.remove();
  if (state.photo) URL.revokeObjectURL(state.photo);
  state.photo = file ? URL.createObjectURL(file) : null;
  if (state.photo) zone.append(element("img", { src: state.photo, alt: `Chosen photo: ${file.name}` }));
  await painter.setBackdrop(state.photo);
  if (!state.photo) applyModel();
  fillRegionPicker();
}

function showEdges() {
  const file = $("condition-image").files[0];
  const wanted = file && $("condition-preprocess").value === "canny";
  $("canny-figure").hidden = !wanted;
  if (!wanted) return;
  const image = new Image();
  image.onload = () => {
    drawEdges(image, $("canny-preview"));
    URL.revokeObjectURL(image.src);
  };
  image.src = URL.createObjectURL(file);
}

function fillRegionPicker() {
  $("mask-region").replaceChildren(
    ...painter.regions.map((_, index) => element("option", { value: String(index), text: `region ${index + 1}` })),
  );
  $("mask-region").value = String(painter.current);
  $("mask-region").style.outline = `3px solid ${painter.colour(painter.current)}`;
}

// -- wiring ----------------------------------------------------------------------------------

function wire() {
  $("api-key").value = savedKey();
  $("api-key").addEventListener("change", () => {
    saveKey($("api-key").value.trim());
    loadModels();
    loadHistory();
  });
  $("model").addEventListener("change", applyModel);
  $("mode").addEventListener("change", () => {
    document.body.dataset.mode = mode();
  });
  $("add-target").addEventListener("click", () => addTarget().focus());
  $("dice").addEventListener("click", () => {
    $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
  });
  for (const id of ["steps", "start-step", "start-layer"]) $(id).addEventListener("input", syncSliders);
  $("image-input").addEventListener("change", () => {
    forget("image");
    showPhoto($("image-input").files[0]);
  });
  $("mask-canvas").addEventListener("pointerdown", () => forget("regions"));
  $("condition-image").addEventListener("change", () => forget("conditionImages"));
  for (const id of ["frames-input", "video-input"]) $(id).addEventListener("change", () => forget("frames"));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) {
      $("image-input").files = event.dataTransfer.files;
      forget("image");
      showPhoto(event.dataTransfer.files[0]);
    }
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("image-input").click();
    }
  });
  $("mask-mode").addEventListener("change", () => {
    $("mask-manual").hidden = $("mask-mode").value !== "manual";
    $("mask-auto").hidden = $("mask-mode").value !== "auto";
    painter.redraw();
  });
  $("mask-side").addEventListener("change", () => {
    painter.side = $("mask-side").value;
    painter.redraw();
  });
  $("mask-tool").addEventListener("change", () => {
    painter.tool = $("mask-tool").value;
  });
  $("brush-size").addEventListener("input", () => {
    painter.size = Number($("brush-size").value);
  });
  $("mask-region").addEventListener("change", () => {
    painter.current = Number($("mask-region").value);
    painter.redraw();
    fillRegionPicker();
  });
  $("add-region").addEventListener("click", () => {
    painter.addRegion();
    fillRegionPicker();
  });
  $("clear-mask").addEventListener("click", () => {
    forget("regions");
    painter.clear();
  });
  $("condition-model").addEventListener("change", () => {
    $("condition-fields").hidden = !$("condition-model").value;
  });
  $("condition-image").addEventListener("change", showEdges);
  $("condition-preprocess").addEventListener("change", showEdges);
  $("refresh-history").addEventListener("click", loadHistory);
  $("cancel").addEventListener("click", cancelJob);
  $("retry").addEventListener("click", retryJob);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    if (!savedKey()) {
      placeError($("api-key").closest(".field"), errorNode(NO_KEY, "error"));
      $("api-key").focus();
      return;
    }
    const suggestion = conditionModelSuggestion();
    if (suggestion) {
      placeError($("model").closest(".field"), errorNode(suggestion, "error"));
      $("model").focus();
      return;
    }
    $("submit").disabled = true;
    try {
      const job = await submitJob();
      showJobPanel();
      // The job keeps its masks as storage keys; the page shows the ones it drew.
      if (state.sentMasks.length) state.masksByJob.set(job.id, state.sentMasks);
      loadHistory();
      await follow(job);
    } catch (error) {
      showErrors(error);
      $("submit").disabled = false;
    }
  });
}

document.body.dataset.mode = mode();
setTargets([""]);
fillRegionPicker();
syncSliders();
wire();
loadModels();
loadHistory();
