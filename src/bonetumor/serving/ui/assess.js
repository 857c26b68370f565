// Whole-slide page: upload one slide to the /assess task, follow its progress, show the necrosis estimate, the
// map and the downloads. Plain DOM code, no framework and no build step.
//
// Safety rule for this file (as app.js): every string that comes from the server or from a file name reaches the
// page through textContent or an attribute, never through innerHTML.
"use strict";

const CLASS_COLOURS = {
  // The map's colours (bonetumor.slide.exports.CLASS_COLOURS, Okabe-Ito): the table's swatches match the image.
  "Non-Tumor": "rgb(0, 114, 178)",
  "Non-Viable-Tumor": "rgb(240, 228, 66)",
  "Viable-Tumor": "rgb(204, 0, 102)",
};
const RUNTIMES = { "onnx-int8": "ONNX Runtime INT8", "onnx-fp32": "ONNX Runtime FP32", torch: "PyTorch" };
const STATES = {
  queued: "Waiting for another assessment to finish…",
  opening: "Reading the slide and finding the tissue…",
  summarising: "Summarising and drawing the map…",
};
const POLL_MS = 1000;

let chosenFile = null;
let running = false;

function $(id) {
  return document.getElementById(id);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function bytes(n) {
  if (n >= 1024 ** 3) return `${(n / 1024 ** 3).toFixed(2)} GB`;
  if (n >= 1024 ** 2) return `${(n / 1024 ** 2).toFixed(1)} MB`;
  return `${Math.max(1, Math.round(n / 1024))} kB`;
}

function pct(value) {
  return value === null || value === undefined ? "n/a" : `${Number(value).toFixed(1)} %`;
}

// The server's own words: BentoML and the upload guard answer {"error": "..."}; anything else is shown as it came.
function messageOf(text, status) {
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return body.error;
    if (Array.isArray(body) && body[0] && typeof body[0].error === "string") return body[0].error;
  } catch (_) {
    // Not JSON: fall through.
  }
  return (text || "").trim() || `HTTP ${status}`;
}

async function getJson(url) {
  let response;
  try {
    response = await fetch(url, { cache: "no-store" });
  } catch (err) {
    throw new Error(`Could not reach the server (${err.message}).`);
  }
  const text = await response.text();
  if (!response.ok) {
    const error = new Error(messageOf(text, response.status));
    error.status = response.status;
    throw error;
  }
  return JSON.parse(text);
}

async function loadModelInfo() {
  try {
    const response = await fetch("/model_info", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: "{}",
    });
    const text = await response.text();
    if (!response.ok) throw new Error(messageOf(text, response.status));
    const info = JSON.parse(text);
    const runtime = info.runtime || {};
    const engine = typeof runtime === "string" ? runtime : runtime.engine;
    $("model-name").textContent = info.name || "unnamed";
    $("model-version").textContent = info.version || "unknown";
    $("model-arch").textContent = info.arch || "unknown";
    $("model-trained").textContent = info.trained_at ? String(info.trained_at).slice(0, 10) : "unknown";
    if (info.trained_at) $("model-trained").title = info.trained_at;
    $("model-runtime").textContent = RUNTIMES[engine] || engine || "unknown";
    const gate = $("model-gate");
    const aliases = Array.isArray(info.aliases) ? info.aliases : [];
    if (aliases.includes("champion")) {
      gate.hidden = true;
    } else {
      const reason = info.gate && info.gate.reason ? ` The gate said: ${info.gate.reason}` : "";
      gate.textContent = `This is not the champion model: it was served as "${info.served_as}".${reason}`;
      gate.hidden = false;
    }
    $("model-info-error").hidden = true;
  } catch (err) {
    $("model-info-error").textContent = `Model information unavailable: ${err.message}`;
    $("model-info-error").hidden = false;
  }
}

function showError(message) {
  const box = $("assess-error");
  box.textContent = message;
  box.hidden = false;
}

function setProgress(text, value, max) {
  $("progress").hidden = false;
  $("progress-text").textContent = text;
  const bar = $("progress-bar");
  if (value === null || value === undefined) {
    bar.removeAttribute("value"); // indeterminate
  } else {
    bar.max = max || 1;
    bar.value = value;
  }
}

// POST the slide as multipart field "slide" with XMLHttpRequest, which reports upload progress (fetch does not).
function submit(file) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("slide", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/assess/submit");
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) {
        setProgress(`Uploading ${bytes(event.loaded)} of ${bytes(event.total)}…`, event.loaded, event.total);
      }
    });
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        try {
          resolve(JSON.parse(xhr.responseText));
        } catch (err) {
          reject(new Error(`Unexpected answer from the server: ${xhr.responseText.slice(0, 200)}`));
        }
      } else {
        reject(new Error(messageOf(xhr.responseText, xhr.status)));
      }
    });
    xhr.addEventListener("error", () => reject(new Error("Could not reach the server (the upload failed).")));
    xhr.send(form);
  });
}

async function showProgress(taskId) {
  try {
    const entry = await getJson(`/ui/assess/progress/${encodeURIComponent(taskId)}`);
    if (entry.state === "tiles" && entry.total) {
      setProgress(`Classifying tissue tiles: ${entry.done} of ${entry.total}`, entry.done, entry.total);
    } else if (entry.state === "summarising" && entry.total) {
      setProgress(STATES.summarising, entry.total, entry.total);
    } else if (STATES[entry.state]) {
      setProgress(STATES[entry.state], null);
    }
  } catch (_) {
    // No progress from this worker (several workers, or not started yet): the status alone is shown.
  }
}

async function follow(taskId) {
  for (;;) {
    const status = await getJson(`/assess/status?task_id=${encodeURIComponent(taskId)}`);
    if (status.status === "completed" || status.status === "failed") break;
    if (status.status === "canceled") throw new Error("The assessment was cancelled.");
    await showProgress(taskId);
    await sleep(POLL_MS);
  }
  // A failed task's result is the server's 400 answer with the reason: getJson throws it as the message.
  return getJson(`/assess/get?task_id=${encodeURIComponent(taskId)}`);
}

function setLink(id, url) {
  const link = $(id);
  if (url) {
    link.href = url;
    link.hidden = false;
  } else {
    link.hidden = true;
  }
}

function render(answer) {
  $("result-name").textContent = answer.name || "the slide";
  $("necrosis-percent").textContent = pct(answer.necrosis_percent);
  const interval = answer.necrosis_interval;
  const level = answer.interval && answer.interval.confidence_level;
  $("necrosis-interval").textContent =
    Array.isArray(interval) && interval[0] !== null
      ? `Interval ${pct(interval[0])} to ${pct(interval[1])}` +
        (level ? ` (${Math.round(level * 100)} % bootstrap, referred tiles counted either way)` : "")
      : "No interval: no tumour tile was found.";
  const response = answer.response || {};
  const category = $("response-category");
  category.textContent = response.category || "unknown";
  category.dataset.certain = String(Boolean(response.certain));
  $("response-text").textContent = response.text || "";

  $("tiles-total").textContent = String(answer.tiles);
  const referred = answer.referred || {};
  $("referred-share").textContent = `${pct(100 * (referred.share || 0))} (${referred.tiles || 0} tiles)`;
  $("tumour-area").textContent = `${answer.tumour_area_mm2} mm² (${answer.tumour_tiles} tiles)`;
  $("tissue-area").textContent = `${answer.tissue_area_mm2} mm²`;
  const input = answer.input || {};
  const tiling = answer.tiling || {};
  $("scale").textContent =
    `${input.mpp} µm/px (${input.mpp_source}); tiles of ${tiling.tile_side_px} px = ${tiling.tile_microns} µm`;
  const model = answer.model || {};
  $("assess-model").textContent =
    `${model.name || ""} v${model.version || "?"}` + (model.runtime ? ` (${RUNTIMES[model.runtime] || model.runtime})` : "");
  const timing = answer.timing || {};
  $("assess-time").textContent = timing.seconds !== undefined ? `${timing.seconds} s` : "n/a";

  const body = $("tiles-per-class");
  body.replaceChildren();
  const perClass = answer.tiles_per_class || {};
  const referredPerClass = referred.per_class || {};
  for (const [name, count] of Object.entries(perClass)) {
    const row = el("tr");
    row.dataset.class = name;
    const cell = el("td");
    const swatch = el("span", "swatch");
    swatch.style.backgroundColor = CLASS_COLOURS[name] || "rgb(128, 128, 128)";
    cell.append(swatch, document.createTextNode(name));
    row.append(cell, el("td", "count", String(count)), el("td", "count", String(referredPerClass[name] || 0)));
    body.append(row);
  }

  const warnings = $("warnings");
  warnings.replaceChildren();
  for (const note of answer.warnings || []) warnings.append(el("li", null, note));

  setLink("download-geojson", answer.geojson_url);
  setLink("download-csv", answer.csv_url);
  setLink("download-json", answer.json_url);
  $("overlay").src = answer.overlay_url || "";
  $("result-disclaimer").textContent = answer.disclaimer || "";
  $("result-audit").textContent =
    `Request ${answer.request_id || "n/a"} · ${answer.timestamp || ""} · input sha256 ` +
    `${(answer.input && answer.input.sha256) || "n/a"} · assessment ${answer.result_id || ""}`;
  $("result").hidden = false;
}

async function assess() {
  if (!chosenFile || running) return;
  running = true;
  $("assess-button").disabled = true;
  $("assess-error").hidden = true;
  $("result").hidden = true;
  document.body.dataset.state = "running";
  try {
    setProgress(`Uploading ${chosenFile.name}…`, 0, 1);
    const submitted = await submit(chosenFile);
    setProgress("Assessment started…", null);
    const answer = await follow(submitted.task_id);
    setProgress("Done.", 1, 1);
    render(answer);
    document.body.dataset.state = "done";
  } catch (err) {
    $("progress").hidden = true;
    showError(`Could not assess ${chosenFile.name}: ${err.message}`);
    document.body.dataset.state = "error";
  } finally {
    running = false;
    $("assess-button").disabled = false;
  }
}

function choose(file) {
  if (!file) return;
  chosenFile = file;
  const chosen = $("chosen");
  chosen.textContent = `${file.name} (${bytes(file.size)})`;
  chosen.hidden = false;
  $("assess-button").disabled = running;
}

function setUp() {
  const input = $("slide-input");
  input.addEventListener("change", () => choose(input.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    choose(event.dataTransfer.files[0]);
  });
  // A slide dropped beside the zone must not make the browser navigate away (and lose the running assessment).
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  $("assess-button").addEventListener("click", assess);
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
