// Clinician page for the bone tumour tile classifier: upload tiles, see the label, the probabilities, the
// referral advice and the Grad-CAM heatmap. Plain DOM code, no framework and no build step.
//
// Safety rule for this file: every string that comes from the server or from a file name reaches the page through
// textContent or an attribute, never through innerHTML, so a crafted file name or message cannot inject markup.
"use strict";

// Class colours are fixed so a clinician learns them once; the text label is always shown too (colour is never
// the only cue).
const CLASS_COLOURS = {
  "Non-Tumor": "#2e7d32",
  "Non-Viable-Tumor": "#f9a825",
  "Viable-Tumor": "#c62828",
};
const RUNTIMES = { "onnx-int8": "ONNX Runtime INT8", "onnx-fp32": "ONNX Runtime FP32", torch: "PyTorch" };

// Replaced by the served model's class order once /model_info answers.
let classes = Object.keys(CLASS_COLOURS);

// Requests go through one promise chain: the 2-core server answers one tile at a time instead of being flooded
// by a drop of 50 tiles, and the answers arrive in the order the tiles were given.
let queue = Promise.resolve();
function enqueue(task) {
  queue = queue.then(task).catch((err) => console.error(err));
  return queue;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

// The server's own words for a refused upload: BentoML answers {"error": "..."} for a 4xx; anything else (a proxy
// page, plain text) is shown as it came.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return body.error;
  } catch (_) {
    // Not JSON: fall through to the raw text.
  }
  return text.trim() || `HTTP ${response.status} ${response.statusText}`;
}

// POST one file as multipart (field "image"); resolves to the JSON answer or throws an Error with the server's
// message.
async function postImage(path, file, extra) {
  const form = new FormData();
  form.append("image", file, file.name);
  for (const [key, value] of Object.entries(extra || {})) form.append(key, value);
  let response;
  try {
    response = await fetch(path, { method: "POST", body: form });
  } catch (err) {
    throw new Error(`Could not reach the server (${err.message}).`);
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

async function loadModelInfo() {
  try {
    const response = await fetch("/model_info", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: "{}",
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const info = await response.json();
    if (Array.isArray(info.classes) && info.classes.length) classes = info.classes;
    const runtime = info.runtime || {};
    const engine = typeof runtime === "string" ? runtime : runtime.engine;
    document.getElementById("model-name").textContent = info.name || "unnamed";
    document.getElementById("model-version").textContent = info.version || "unknown";
    document.getElementById("model-arch").textContent = info.arch || "unknown";
    // The card says what the model is for and not for: offered only when the served version has one.
    document.getElementById("model-card-nav").hidden = !info.model_card;
    const trained = document.getElementById("model-trained");
    // The date is what a reader needs; the full timestamp stays in the tooltip for an audit.
    trained.textContent = info.trained_at ? String(info.trained_at).slice(0, 10) : "unknown";
    if (info.trained_at) trained.title = info.trained_at;
    const runtimeNode = document.getElementById("model-runtime");
    runtimeNode.textContent = RUNTIMES[engine] || engine || "unknown";
    if (runtime.reason) runtimeNode.title = runtime.reason;
    // A version the champion gate kept back (served by asking for @challenger or a version number) must not
    // look like the approved model.
    const gate = document.getElementById("model-gate");
    const aliases = Array.isArray(info.aliases) ? info.aliases : [];
    if (aliases.includes("champion")) {
      gate.hidden = true;
    } else {
      const reason = info.gate && info.gate.reason ? ` The gate said: ${info.gate.reason}` : "";
      gate.textContent = `This is not the champion model: it was served as "${info.served_as}".${reason}`;
      gate.hidden = false;
    }
    document.getElementById("model-info-error").hidden = true;
  } catch (err) {
    const box = document.getElementById("model-info-error");
    box.textContent = `Model information unavailable: ${err.message}`;
    box.hidden = false;
  }
}

// One card per file, created as soon as the file is chosen so the clinician sees the queue; data-state
// (queued, predicting, explaining, done, error) says how far it got.
function createCard(file) {
  const card = el("article", "result-card");
  card.dataset.state = "queued";
  card.append(el("h3", "file-name", file.name));
  card.append(el("p", "status", "Waiting…"));
  return card;
}

function setState(card, state, message) {
  card.dataset.state = state;
  const status = card.querySelector(".status");
  status.textContent = message || "";
  status.hidden = !message;
}

function renderPrediction(card, answer, tileUrl) {
  const labelRow = el("p", "label-row");
  labelRow.append("Predicted: ");
  const label = el("strong", "label", answer.label);
  label.style.setProperty("--class-colour", CLASS_COLOURS[answer.label] || "#455a64");
  label.dataset.class = answer.label;
  labelRow.append(label, el("span", "confidence", ` confidence ${percent(answer.confidence)}`));
  card.append(labelRow);

  if (answer.referral && answer.referral.refer) {
    const banner = el("p", "referral", `Refer to a pathologist: ${answer.referral.reason}`);
    banner.setAttribute("role", "alert");
    card.append(banner);
  }

  // Probability bars in the model's class order; the bar width is the probability, the number is beside it.
  const probs = el("ul", "probabilities");
  probs.setAttribute("aria-label", "Class probabilities");
  const names = classes.filter((c) => c in answer.probabilities);
  for (const name of names.length ? names : Object.keys(answer.probabilities)) {
    const p = answer.probabilities[name];
    const row = el("li", "prob-row");
    row.dataset.class = name;
    const track = el("span", "prob-track");
    const bar = el("span", "prob-bar");
    bar.style.width = `${100 * p}%`;
    bar.style.backgroundColor = CLASS_COLOURS[name] || "#455a64";
    bar.dataset.probability = String(p);
    track.append(bar);
    row.append(el("span", "prob-name", name), track, el("span", "prob-value", percent(p)));
    probs.append(row);
  }
  card.append(probs);
  if (typeof answer.tissue_fraction === "number") {
    card.append(el("p", "tissue", `Tissue in tile: ${percent(answer.tissue_fraction)}`));
  }

  // Grad-CAM: the tile and, once /explain answers, the heatmap in the same square box. object-fit: cover draws the
  // tile's square centre crop, the region the model saw and the heatmap covers.
  const figure = el("figure", "cam");
  const box = el("div", "cam-box");
  const tile = el("img", "tile");
  tile.src = tileUrl;
  tile.alt = "The uploaded tile (square centre crop)";
  box.append(tile);
  figure.append(box);
  const caption = el("figcaption", "cam-caption", "Grad-CAM: computing the heatmap…");
  figure.append(caption);
  card.append(figure);

  const controls = el("div", "cam-controls");
  const sliderId = `opacity-${crypto.randomUUID ? crypto.randomUUID() : Math.random().toString(36).slice(2)}`;
  const sliderLabel = el("label", null, "Heatmap opacity");
  sliderLabel.htmlFor = sliderId;
  const slider = el("input", "opacity");
  Object.assign(slider, { type: "range", id: sliderId, min: "0", max: "1", step: "0.05", value: "0.5" });
  slider.disabled = true; // until there is a heatmap to fade
  slider.addEventListener("input", () => {
    const heatmap = box.querySelector(".heatmap");
    if (heatmap) heatmap.style.opacity = slider.value;
  });
  controls.append(sliderLabel, slider);
  card.append(controls);

  const model = answer.model || {};
  const audit = el("p", "audit");
  audit.append(
    el("span", "request-id", `Request ${answer.request_id || "n/a"}`),
    el("span", "model-version", ` · model ${model.name || ""} v${model.version || "?"}`),
    el("span", null, model.runtime ? ` (${model.runtime})` : ""),
    el("span", null, answer.timestamp ? ` · ${answer.timestamp}` : ""),
  );
  card.append(audit);
  return { box, caption, slider, audit };
}

function renderHeatmap(view, answer) {
  let heatmap = view.box.querySelector(".heatmap");
  if (!heatmap) {
    heatmap = el("img", "heatmap");
    view.box.append(heatmap);
  }
  heatmap.alt = `Grad-CAM heatmap for ${answer.target || answer.label}`;
  heatmap.style.opacity = view.slider.value;
  heatmap.src = `data:image/png;base64,${answer.heatmap_png}`;
  view.slider.disabled = false;
  view.caption.textContent =
    `Grad-CAM for ${answer.target || answer.label}: warm colours mark the regions that drove this class.`;
  view.audit.append(el("span", "explain-id", ` · heatmap request ${answer.request_id || "n/a"}`));
}

async function processFile(file, card) {
  // The tile is drawn from the local file: no second upload and no server copy of the image is needed.
  const tileUrl = URL.createObjectURL(file);
  card.dataset.objectUrl = tileUrl;
  setState(card, "predicting", "Classifying…");
  let answer;
  try {
    answer = await postImage("/predict", file);
  } catch (err) {
    URL.revokeObjectURL(tileUrl);
    setState(card, "error");
    card.append(el("p", "error", `Could not classify this file: ${err.message}`));
    card.querySelector(".error").setAttribute("role", "alert");
    return;
  }
  setState(card, "explaining");
  const view = renderPrediction(card, answer, tileUrl);
  try {
    renderHeatmap(view, await postImage("/explain", file));
  } catch (err) {
    // The label stands on its own; a failed heatmap is said plainly and does not hide it.
    view.caption.textContent = `Grad-CAM unavailable: ${err.message}`;
    view.caption.classList.add("explain-error");
  }
  setState(card, "done");
}

function addFiles(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  // The newest batch goes on top, in the order the files were given.
  const results = document.getElementById("results");
  const batch = document.createDocumentFragment();
  const cards = files.map((file) => batch.appendChild(createCard(file)));
  results.prepend(batch);
  files.forEach((file, i) => enqueue(() => processFile(file, cards[i])));
}

function setUp() {
  const input = document.getElementById("file-input");
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = ""; // so choosing the same file again is a new upload
  });

  const zone = document.getElementById("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addFiles(event.dataTransfer.files);
  });
  // A tile dropped beside the zone must not make the browser navigate away from the page (and lose the results).
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  document.getElementById("clear-results").addEventListener("click", () => {
    const results = document.getElementById("results");
    // Only finished cards go: a queued card still has a request coming for it.
    for (const card of results.querySelectorAll(".result-card[data-state=done], .result-card[data-state=error]")) {
      if (card.dataset.objectUrl) URL.revokeObjectURL(card.dataset.objectUrl);
      card.remove();
    }
  });

  loadModelInfo();
  // The service follows the registry's alias: refresh the header so a promoted version shows without a reload.
  setInterval(loadModelInfo, 30000);
}

document.addEventListener("DOMContentLoaded", setUp);
