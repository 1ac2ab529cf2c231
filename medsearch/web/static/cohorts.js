// Cohorts on the page: save the current results as a cohort (the server stores the query and
// its provenance), list the saved ones, show one's members with its provenance and a download.
"use strict";

const MAX_MEMBERS_SHOWN = 200;

async function postJSON(path, body) {
  return (await checked(await fetch(at(path), {
    method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) }))).json();
}

// The body the server re-runs on refresh: the search or similar request as sent (first page);
// an upload cannot be re-run from a body, so its cohort is the ids shown.
function cohortBody(name) {
  const { request, results } = current;
  if (request.kind === "search") return { name, search: withoutPaging(request.json) };
  if (request.kind === "similar") return { name, similar: withoutPaging(request.json) };
  return { name, ids: results.map((r) => r.id) };
}

function withoutPaging(body) {
  const out = { ...body };
  delete out.offset;
  return out;
}

async function saveCohort() {
  const name = $("cohort-name").value.trim();
  showError("");
  if (!current) return;
  if (!name) { showError("Give the cohort a name (letters, digits, . _ -)."); return; }
  try {
    const cohort = await postJSON("/cohorts", cohortBody(name));
    $("status").textContent = `Saved cohort ${cohort.name} (${cohort.count} images).`;
  } catch (err) {
    showError(err.message);
  }
}

function cohortLink(name) {
  const a = document.createElement("a");
  a.href = hashOf({ view: "cohort", cohort: name });
  a.textContent = name;
  return a;
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content); else td.textContent = valueText(content);
  row.append(td);
}

async function listCohorts() {
  const data = await getJSON("/cohorts");
  $("cohort-title").textContent = "Cohorts";
  const body = $("cohort-table").querySelector("tbody");
  body.replaceChildren();
  for (const c of data.cohorts) {
    const tr = document.createElement("tr");
    tr.dataset.name = c.name;
    cell(tr, cohortLink(c.name));
    for (const key of ["kind", "count", "created", "refreshed"]) cell(tr, c[key]);
    body.append(tr);
  }
  $("cohort-table").hidden = false;
  $("status").textContent = `${data.cohorts.length} cohort${data.cohorts.length === 1 ? "" : "s"}`;
}

function downloadLink(name, format) {
  const a = document.createElement("a");
  a.href = at(`/cohorts/${encodeURIComponent(name)}/export?format=${format}`);
  a.download = `${name}.${format}`;
  a.className = "download";
  a.textContent = `Download ${format.toUpperCase()}`;
  return a;
}

async function memberRow(id) {
  try { return await getJSON(`/images/${id}`); }
  catch (e) { return { id, path: "(no longer in the store)", frame: 0, metadata: {} }; }
}

async function showCohort(name) {
  const cohort = await getJSON(`/cohorts/${encodeURIComponent(name)}`);
  $("cohort-title").textContent = `Cohort ${cohort.name} · ${cohort.kind} · ${cohort.count} images`;
  $("cohort-table").hidden = true;
  const all = document.createElement("a");
  all.href = hashOf({ view: "cohorts" });
  all.textContent = "All cohorts";
  $("cohort-links").replaceChildren(all, downloadLink(cohort.name, "csv"), downloadLink(cohort.name, "parquet"));
  const provenance = $("cohort-provenance");
  provenance.textContent = JSON.stringify(cohort.provenance || {}, null, 2);
  provenance.hidden = false;
  const rows = await Promise.all(cohort.ids.slice(0, MAX_MEMBERS_SHOWN).map(memberRow));
  current = { state: readHash(), request: { kind: "cohort", label: `cohort ${cohort.name}` },
              results: rows, next: null };
  render(rows, `cohort ${cohort.name}` + (cohort.ids.length > rows.length
    ? ` (first ${rows.length} of ${cohort.ids.length} shown; download for all)` : ""), 0, false);
}

async function showCohorts(state) {
  $("cohort-view").hidden = false;
  $("cohort-links").replaceChildren();
  $("cohort-provenance").hidden = true;
  try {
    if (state.view === "cohort" && state.cohort) await showCohort(state.cohort);
    else await listCohorts();
  } catch (err) {
    showError(err.message);
  }
}

function initCohorts() {
  $("save-cohort-button").addEventListener("click", saveCohort);
}
