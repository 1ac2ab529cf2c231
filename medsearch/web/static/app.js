// medsearch web page: plain browser JavaScript, no build step. Talks to the JSON API of the
// same origin; with a token, the browser's own Basic-auth prompt (token as password) signs
// every request, thumbnails included. The search's state and requests: state.js; the detail
// panel and region boxes: detail.js; cohorts: cohorts.js.
"use strict";

const $ = (id) => document.getElementById(id);
// Absolute same-origin URLs: a page opened as http://user:token@host/ would otherwise resolve
// relative URLs with the credentials in them, which browsers refuse for fetch and images.
const at = (path) => location.origin + path;
// What this server accepts, read from its OpenAPI schema: fields it does not know are refused.
const features = { shape: false, region: false, cohorts: false, duplicates: false, imageSize: null, patientKeys: null };
let imageFile = null;      // a dropped/chosen image: searches use it (plus any text)
let current = null;        // {state, request, results, next} of the results shown
const marks = new Map();   // id -> "rel" | "nrel": relevance feedback for the next re-run

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function call(path, request, extra) {
  const init = { method: "POST", credentials: "same-origin" };
  if (request.json) {
    init.headers = { "Content-Type": "application/json" };
    init.body = JSON.stringify({ ...request.json, ...(extra || {}) });
  } else {
    init.body = request.form(extra || {});
  }
  return checked(await fetch(at(path), init));
}

async function checked(response) {
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      message = body.error || (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) || message;
    } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function getJSON(path) {
  return (await checked(await fetch(at(path), { credentials: "same-origin" }))).json();
}

function clearResults() {
  $("results").replaceChildren();
  $("toolbar").hidden = true;
  $("more-button").hidden = true;
  $("status").textContent = "";
  current = null;
}

async function run(state) {
  const request = requestOf(state);
  showError("");
  $("status").textContent = "Searching…";
  $("search-button").disabled = true;
  const started = performance.now();
  try {
    const data = await (await call(request.path, request)).json();
    current = { state, request, results: data.results, next: nextOf(data, commonOf(state).k, data.results.length) };
    if ((state.rel || state.nrel) && data.query_expression) $("query").value = data.query_expression;
    render(data.results, request.label, performance.now() - started, false);
  } catch (err) {
    clearResults();   // never leave another query's results under an error
    showError(err.message);
  } finally {
    $("search-button").disabled = false;
  }
}

// Paging: the server's next_offset where it gives one; else ask again for more rows (older
// servers), which stops once a larger k returns fewer rows than asked for.
function nextOf(data, k, shown) {
  if ("next_offset" in data) return data.next_offset;
  return shown >= k && shown < 1000 ? "rerun" : null;
}

async function more() {
  if (!current || current.next === null) return;
  const { request } = current;
  const base = commonOf(current.state).k;
  $("more-button").disabled = true;
  try {
    if (current.next === "rerun") {
      const k = Math.min(1000, current.results.length + base);
      const data = await (await call(request.path, request, { k })).json();
      current.results = data.results;
      current.next = data.results.length >= k && k < 1000 ? "rerun" : null;
      render(data.results, request.label, 0, false);
    } else {
      const data = await (await call(request.path, request, { offset: current.next })).json();
      current.results = current.results.concat(data.results);
      current.next = data.next_offset;
      render(data.results, request.label, 0, true);
    }
  } catch (err) {
    showError(err.message);
  } finally {
    $("more-button").disabled = false;
  }
}

function tags(meta) {
  return ["modality", "body_part", "study_date"].map((k) => meta[k]).filter(Boolean).join(" · ");
}

function markButton(r, kind, text, title) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `mark ${kind}`;
  b.textContent = text;
  b.title = title;
  b.setAttribute("aria-label", `${title}: image ${r.id}`);
  b.setAttribute("aria-pressed", String(marks.get(r.id) === kind));
  b.addEventListener("click", (e) => {
    e.stopPropagation();
    if (marks.get(r.id) === kind) marks.delete(r.id); else marks.set(r.id, kind);
    document.querySelectorAll(`#results .card[data-id="${r.id}"] .mark`).forEach((m) =>
      m.setAttribute("aria-pressed", String(marks.get(r.id) === m.classList[1])));
    $("feedback-button").hidden = !(features.shape && marks.size);
  });
  b.addEventListener("keydown", (e) => e.stopPropagation());
  return b;
}

// A saved cohort or the near-copy groups: a listing, not a query to refine, page or save.
function listing() {
  return current && ["cohort", "duplicates"].includes(current.request.kind);
}

function card(r, rank) {
  const li = document.createElement("li");
  li.className = "card";
  li.tabIndex = 0;
  li.dataset.id = r.id;
  if (r.score !== undefined) li.dataset.score = r.score;
  li.title = `${r.path}${r.frame ? " [frame " + r.frame + "]" : ""}\nclick or Enter: details`;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = `image ${r.id}`;
  img.src = at(`/images/${r.id}/preview?size=256`);
  const meta = document.createElement("div");
  meta.className = "meta";
  const line = (cls, text) => {
    const el = document.createElement(cls === "rank" ? "span" : "div");
    el.className = cls;
    el.textContent = text;
    meta.append(el);
  };
  line("rank", `#${rank} · id ${r.id}`);
  line("score", r.score !== undefined ? r.score.toFixed(3) : "member");
  if (r.prob !== undefined && r.prob !== null) line("prob", `p ${r.prob.toFixed(3)}`);
  if (r.group_count !== undefined && r.group_count !== null) line("group", `${r.group_count} in group`);
  if (r.copy_group !== undefined) line("group", `near-copy group ${r.copy_group}`);
  line("name", (r.path || "").split(/[\\/]/).pop() + (r.frame ? ` [${r.frame}]` : ""));
  line("tags", tags(r.metadata || {}));
  if (features.shape && current && !listing()) {
    const buttons = document.createElement("div");
    buttons.className = "marks";
    buttons.append(markButton(r, "rel", "+", "relevant"), markButton(r, "nrel", "−", "not relevant"));
    meta.append(buttons);
  }
  li.append(img, meta);
  li.addEventListener("click", () => openDetail(r.id, li));
  li.addEventListener("keydown", (e) => {
    // preventDefault: the Enter would otherwise go on to press the panel's focused close button
    if (e.key === "Enter") { e.preventDefault(); openDetail(r.id, li); }
  });
  return li;
}

function render(results, label, millis, append) {
  const grid = $("results");
  if (!append) grid.replaceChildren();
  const start = grid.children.length;
  results.forEach((r, i) => grid.append(card(r, start + i + 1)));
  const total = grid.children.length;
  $("status").textContent = `${total} result${total === 1 ? "" : "s"}` +
    (millis ? ` in ${Math.round(millis)} ms` : "");
  $("summary").textContent = label;
  $("toolbar").hidden = total === 0;
  $("more-button").hidden = !current || current.next === null || current.next === undefined;
  $("feedback-button").hidden = !(features.shape && marks.size && current && !listing());
  $("save-cohort").hidden = !(features.cohorts && current && !listing());
  $("export-tools").hidden = !current || listing();  // it has its own links
}

async function exportResults() {
  if (!current || listing()) return;
  const format = $("export-format").value;
  showError("");
  try {
    // the rows shown: as many as "more" has brought in, from the first one
    const extra = { k: Math.max(current.results.length, commonOf(current.state).k) };
    const response = await call(`/export?format=${format}`, current.request, extra);
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

// The form's search: an image if one is chosen, else the text; with an empty box, a similar
// search keeps its image and takes the new filters. Feedback marks start afresh (a returned
// query expression already holds them).
function search() {
  const state = formState();
  const text = $("query").value.trim();
  const last = readHash();
  if (text) state.q = text;
  if (imageFile) state.mode = "upload";
  else if (!text && last.mode === "similar" && last.id !== undefined) {
    Object.assign(state, { mode: "similar", id: last.id, region: last.region, rs: last.rs });
  } else if (text) state.mode = "text";
  else { showError("Type what to look for, or drop an image."); return; }
  marks.clear();
  go(state);
}

function rerunWithFeedback() {
  const state = { ...readHash() };
  const ids = (kind) => [...marks].filter(([, k]) => k === kind).map(([id]) => id).join(",");
  state.rel = ids("rel");
  state.nrel = ids("nrel");
  go(state);
}

// Run whatever the fragment says (on load, on every hashchange).
function route() {
  const state = readHash();
  closeDetail();
  applyForm(state);
  marks.clear();
  idList(state.rel).forEach((id) => marks.set(id, "rel"));
  idList(state.nrel).forEach((id) => marks.set(id, "nrel"));
  $("cohort-view").hidden = true;
  showError("");
  if (state.view === "cohorts" || state.view === "cohort") {
    clearResults();
    showCohorts(state);
  } else if (state.view === "duplicates") {
    clearResults();
    showDuplicates();
  } else if (state.mode === "upload" && !imageFile) {
    clearResults();
    $("status").textContent = "This search was by an image, which is never put in the link: drop the image again.";
  } else if (state.mode === "upload" || (state.mode === "similar" && state.id !== undefined) || state.q) {
    run(state);
  } else {
    clearResults();
  }
}

function useImage(file) {
  if (!file) return;
  imageFile = file;
  $("drop-zone").classList.add("active");
  $("drop-label").textContent = `Searching by image: ${file.name || "dropped image"} ` +
    `(${Math.ceil(file.size / 1024)} KB). Text in the box is added to it.`;
  $("clear-image").hidden = false;
  showUploadRegion(file);
  search();
}

function clearImage(event) {
  event.stopPropagation();
  imageFile = null;
  $("file-input").value = "";
  $("drop-zone").classList.remove("active");
  $("drop-label").textContent = "Drop an image here (PNG, JPEG, DICOM) or click to choose one, to search by image";
  $("clear-image").hidden = true;
  hideUploadRegion();
}

function fieldsOf(schema, name) {
  const model = ((schema.components || {}).schemas || {})[name] || {};
  return model.properties || {};
}

async function loadFeatures() {
  try {
    const schema = await getJSON("/openapi.json");
    features.shape = "distinct" in fieldsOf(schema, "SearchBody");
    features.region = "region" in fieldsOf(schema, "SimilarBody");
    features.cohorts = "/cohorts" in (schema.paths || {});
    features.duplicates = "/duplicates" in (schema.paths || {});
  } catch (e) { /* the page still searches without the newer fields */ }
  try {
    const s = await getJSON("/stats");
    $("store-info").textContent = `${s.count} images · ${s.model.split("/").pop()}`;
    features.imageSize = s.image_size || null;
    features.patientKeys = "patient_keys" in s ? Boolean(s.patient_keys) : null;
    const list = $("modalities");
    Object.keys(s.modalities || {}).filter((m) => m && m !== "None").forEach((m) => {
      const option = document.createElement("option");
      option.value = m;
      list.append(option);
    });
  } catch (e) { /* the page still works without stats */ }
  for (const id of ["f-distinct", "f-min-prob", "f-dedupe"]) $(id).disabled = !features.shape;
  const patient = $("f-distinct").querySelector('option[value="patient"]');
  patient.disabled = features.patientKeys === false;
  $("shaping-note").textContent = !features.shape
    ? "(this server does not offer these yet)"
    : features.patientKeys === false ? "(no patient keys stored: one row per patient is not possible)" : "";
  $("cohorts-link").hidden = !features.cohorts;
  $("duplicates-link").hidden = !features.duplicates;
  $("detail-cohort").hidden = !features.cohorts;
  $("detail-region").hidden = !features.region;
}

async function init() {
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
  $("more-button").addEventListener("click", more);
  $("feedback-button").addEventListener("click", rerunWithFeedback);
  initDetail();
  initCohorts();
  await loadFeatures();
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", init);
