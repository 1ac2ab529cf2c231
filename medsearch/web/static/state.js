// The page's state in the URL fragment, and the API requests a state stands for.
//
// The search lives in the fragment (after "#"): browsers never send it to the server, so query
// text stays out of access logs, while a search can still be bookmarked, reloaded, shared and
// gone back to. The fragment is the one source of truth: the form writes it, and every
// hashchange (a submit, the back button, a pasted link) reads it and runs what it says.
"use strict";

const STATE_KEYS = ["view", "cohort", "mode", "q", "id", "region", "rs", "k", "modality",
  "body_part", "date_from", "date_to", "label", "min_score", "distinct", "min_prob", "dedupe",
  "rel", "nrel"];
const FORM_FIELDS = { modality: "f-modality", body_part: "f-body-part", date_from: "f-date-from",
  date_to: "f-date-to", label: "f-label", k: "f-k", min_score: "f-min-score",
  distinct: "f-distinct", min_prob: "f-min-prob", dedupe: "f-dedupe" };
const DEFAULT_K = 24;

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const state = {};
  for (const key of STATE_KEYS) {
    const value = params.get(key);
    if (value !== null && value !== "") state[key] = value;
  }
  return state;
}

function hashOf(state) {
  const params = new URLSearchParams();
  for (const key of STATE_KEYS) {
    if (state[key] !== undefined && state[key] !== null && state[key] !== "") params.set(key, String(state[key]));
  }
  return "#" + params.toString();
}

// Navigate to a state: a new history entry (so "back" returns here), or a re-run of the same.
function go(state) {
  const hash = hashOf(state);
  if (hash === location.hash) route();
  else location.hash = hash;
}

function formState() {
  const state = {};
  for (const [key, id] of Object.entries(FORM_FIELDS)) {
    const value = $(id).value.trim();
    if (value !== "" && !(key === "k" && value === String(DEFAULT_K))) state[key] = value;
  }
  return state;
}

function applyForm(state) {
  for (const [key, id] of Object.entries(FORM_FIELDS)) {
    $(id).value = state[key] !== undefined ? state[key] : (key === "k" ? String(DEFAULT_K) : "");
  }
  $("query").value = state.q || "";
}

const idList = (text) => (text || "").split(",").map((s) => parseInt(s, 10)).filter((n) => n >= 0);

function filtersOf(state) {
  const f = {};
  const list = (v) => (v || "").split(",").map((s) => s.trim()).filter(Boolean);
  for (const key of ["modality", "body_part", "label"]) {
    const values = list(state[key]);
    if (values.length) f[key] = values;
  }
  if (state.date_from) f.date_from = state.date_from;
  if (state.date_to) f.date_to = state.date_to;
  return f;
}

// The JSON fields a state adds to /search and /similar; the new ones only when set, so a server
// without them still answers plain searches.
function commonOf(state) {
  const out = { k: parseInt(state.k, 10) || DEFAULT_K };
  const f = filtersOf(state);
  if (Object.keys(f).length) out.filters = f;
  if (state.min_score !== undefined) out.min_score = parseFloat(state.min_score);
  if (state.distinct) out.distinct = state.distinct;
  if (state.min_prob !== undefined) out.min_prob = parseFloat(state.min_prob);
  if (state.dedupe !== undefined) out.dedupe = parseFloat(state.dedupe);
  if (state.rel) out.relevant = idList(state.rel);
  if (state.nrel) out.not_relevant = idList(state.nrel);
  return out;
}

function regionOf(state) {
  const box = (state.region || "").split(",").map((s) => parseInt(s, 10));
  return box.length === 4 && box.every((n) => Number.isFinite(n)) ? box : null;
}

// {path, json: body | null, form: () => FormData | null, label, kind} for a state.
function requestOf(state) {
  const common = commonOf(state);
  if (state.mode === "similar" && state.id !== undefined) {
    const body = { id: parseInt(state.id, 10), ...common };
    if (state.q) body.query = state.q;
    const region = regionOf(state);
    if (region) { body.region = region; body.region_space = state.rs || "preview"; }
    return { path: "/similar", json: body, kind: "similar",
             label: `similar to ${region ? "a region of " : ""}image #${body.id}` };
  }
  if (state.mode === "upload") {
    const file = imageFile;
    const region = regionOf(state);
    return { path: "/similar", kind: "upload", file, region,
             label: `similar to ${region ? "a region of " : ""}${file.name || "the image"}${state.q ? " and " + state.q : ""}`,
             form: (extra) => uploadForm(file, state.q, { ...common, ...extra }, region) };
  }
  return { path: "/search", json: { query: state.q, ...common }, kind: "search", label: state.q };
}

function uploadForm(file, text, fields, region) {
  const form = new FormData();
  form.append("file", file, file.name || "image");
  for (const [key, value] of Object.entries(fields)) {
    if (key === "filters") form.append(key, JSON.stringify(value));
    else if (Array.isArray(value)) form.append(key, value.join(","));
    else form.append(key, String(value));
  }
  if (text) form.append("query", text);
  if (region) { form.append("region", region.join(",")); form.append("region_space", "image"); }
  return form;
}
