// medsearch web page: plain browser JavaScript, no build step. Talks to the JSON API of the
// same origin; with a token, the browser's own Basic-auth prompt (token as password) signs
// every request, thumbnails included.
"use strict";

const $ = (id) => document.getElementById(id);
// Absolute same-origin URLs: a page opened as http://user:token@host/ would otherwise resolve
// relative URLs with the credentials in them, which browsers refuse for fetch and images.
const at = (path) => location.origin + path;
let imageFile = null;      // a dropped/chosen image: searches use it (plus any text)
let lastRequest = null;    // {path, body: () => fetch body, json: bool, label} for export

function filters() {
  const f = {};
  const list = (v) => v.split(",").map((s) => s.trim()).filter(Boolean);
  const modality = list($("f-modality").value);
  const bodyPart = list($("f-body-part").value);
  const label = list($("f-label").value);
  if (modality.length) f.modality = modality;
  if (bodyPart.length) f.body_part = bodyPart;
  if (label.length) f.label = label;
  if ($("f-date-from").value) f.date_from = $("f-date-from").value;
  if ($("f-date-to").value) f.date_to = $("f-date-to").value;
  return f;
}

function common() {
  const out = { k: parseInt($("f-k").value, 10) || 24 };
  const f = filters();
  if (Object.keys(f).length) out.filters = f;
  const min = $("f-min-score").value;
  if (min !== "") out.min_score = parseFloat(min);
  return out;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function call(path, request) {
  const init = { method: "POST", credentials: "same-origin" };
  if (request.json) {
    init.headers = { "Content-Type": "application/json" };
    init.body = JSON.stringify(request.body());
  } else {
    init.body = request.body();
  }
  const response = await fetch(at(path), init);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function run(request) {
  showError("");
  $("status").textContent = "Searching…";
  $("search-button").disabled = true;
  const started = performance.now();
  try {
    const response = await call(request.path, request);
    const data = await response.json();
    lastRequest = request;
    render(data.results, request.label, performance.now() - started);
  } catch (err) {
    $("status").textContent = "";
    $("results").replaceChildren();   // never leave another query's results under an error
    $("toolbar").hidden = true;
    lastRequest = null;
    showError(err.message);
  } finally {
    $("search-button").disabled = false;
  }
}

function uploadBody(file, extra, c) {
  const form = new FormData();
  form.append("file", file, file.name || "image");
  form.append("k", String(c.k));
  if (c.min_score !== undefined) form.append("min_score", String(c.min_score));
  if (c.filters) form.append("filters", JSON.stringify(c.filters));
  if (extra) form.append("query", extra);
  return form;
}

function search() {
  const text = $("query").value.trim();
  if (imageFile) {
    const file = imageFile, c = common();
    run({ path: "/similar", json: false, body: () => uploadBody(file, text, c),
          label: `similar to ${file.name || "the image"}${text ? " and " + text : ""}` });
  } else if (text) {
    const body = { query: text, ...common() };
    run({ path: "/search", json: true, body: () => body, label: text });
  } else {
    showError("Type what to look for, or drop an image.");
  }
}

function similarTo(id) {
  const body = { id, ...common() };
  run({ path: "/similar", json: true, body: () => body,
        label: `similar to image #${id}` });
}

function tags(meta) {
  return ["modality", "body_part", "study_date"].map((k) => meta[k]).filter(Boolean).join(" · ");
}

function render(results, label, millis) {
  const grid = $("results");
  grid.replaceChildren();
  results.forEach((r, i) => {
    const li = document.createElement("li");
    li.className = "card";
    li.tabIndex = 0;
    li.dataset.id = r.id;
    li.dataset.score = r.score;
    li.title = `${r.path}${r.frame ? " [frame " + r.frame + "]" : ""}\nclick: similar cases`;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = `image ${r.id}`;
    img.src = at(`/images/${r.id}/preview?size=256`);
    const meta = document.createElement("div");
    meta.className = "meta";
    const name = r.path.split(/[\\/]/).pop();
    meta.innerHTML = `<span class="rank"></span><div class="score"></div><div class="name"></div><div class="tags"></div>`;
    meta.querySelector(".rank").textContent = `#${i + 1} · id ${r.id}`;
    meta.querySelector(".score").textContent = r.score.toFixed(3);
    meta.querySelector(".name").textContent = name + (r.frame ? ` [${r.frame}]` : "");
    meta.querySelector(".tags").textContent = tags(r.metadata || {});
    li.append(img, meta);
    li.addEventListener("click", () => similarTo(r.id));
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") similarTo(r.id); });
    grid.append(li);
  });
  $("status").textContent = `${results.length} result${results.length === 1 ? "" : "s"} in ${Math.round(millis)} ms`;
  $("summary").textContent = label;
  $("toolbar").hidden = results.length === 0;
}

async function exportResults() {
  if (!lastRequest) return;
  const format = $("export-format").value;
  showError("");
  try {
    const response = await call(`/export?format=${format}`, lastRequest);
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = `medsearch-cohort.${format}`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    $("status").textContent = `exported ${format.toUpperCase()}`;
  } catch (err) {
    showError(err.message);
  }
}

function useImage(file) {
  if (!file) return;
  imageFile = file;
  $("drop-zone").classList.add("active");
  $("drop-label").textContent = `Searching by image: ${file.name || "dropped image"} ` +
    `(${Math.ceil(file.size / 1024)} KB). Text in the box is added to it.`;
  $("clear-image").hidden = false;
  search();
}

function clearImage(event) {
  event.stopPropagation();
  imageFile = null;
  $("file-input").value = "";
  $("drop-zone").classList.remove("active");
  $("drop-label").textContent = "Drop an image here (PNG, JPEG, DICOM) or click to choose one, to search by image";
  $("clear-image").hidden = true;
}

async function loadStats() {
  try {
    const response = await fetch(at("/stats"), { credentials: "same-origin" });
    if (!response.ok) return;
    const s = await response.json();
    $("store-info").textContent = `${s.count} images · ${s.model.split("/").pop()}`;
    const list = $("modalities");
    Object.keys(s.modalities || {}).filter((m) => m && m !== "None").forEach((m) => {
      const option = document.createElement("option");
      option.value = m;
      list.append(option);
    });
  } catch (e) { /* the page still works without stats */ }
}

function init() {
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  const zone = $("drop-zone");
  zone.addEventListener("click", () => $("file-input").click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file-input").click(); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("hover"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("hover"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("hover");
    useImage(e.dataTransfer.files[0]);
  });
  $("file-input").addEventListener("change", (e) => useImage(e.target.files[0]));
  $("clear-image").addEventListener("click", clearImage);
  $("export-button").addEventListener("click", exportResults);
  loadStats();
}

document.addEventListener("DOMContentLoaded", init);
