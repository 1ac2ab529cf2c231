// The detail panel of one result (larger preview, every stored field, "similar to this",
// "region of this", "add to cohort") and the region box a user drags on a query image.
"use strict";

let detailId = null;       // the image the panel shows
let detailFrom = null;     // the card that opened it: focus returns there on close
let detailRegion = null;   // the region tool on the panel's preview
let uploadRegion = null;   // the region tool on an uploaded image
let uploadURL = null;

// A box dragged (or typed) on an image, in the image's own pixels (its natural size).
function regionTool(area, inputsBox) {
  const img = area.querySelector("img");
  const box = area.querySelector(".region-box");
  const inputs = {};
  for (const name of ["x", "y", "w", "h"]) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "number";
    input.min = "0";
    input.id = `${inputsBox.id}-${name}`;
    input.addEventListener("input", () => draw());
    label.append(`${name} `, input);
    inputsBox.append(label);
    inputs[name] = input;
  }
  const tool = { enabled: false };
  let start = null;
  const size = () => [img.naturalWidth || 1, img.naturalHeight || 1];
  const point = (e) => {
    const r = img.getBoundingClientRect();
    const [w, h] = size();
    const clamp = (v, hi) => Math.max(0, Math.min(hi, v));
    return [clamp((e.clientX - r.left) * w / r.width, w), clamp((e.clientY - r.top) * h / r.height, h)];
  };
  tool.value = () => {
    const v = ["x", "y", "w", "h"].map((n) => parseInt(inputs[n].value, 10));
    return v.every((n) => Number.isFinite(n)) && v[2] > 0 && v[3] > 0 ? v : null;
  };
  tool.set = (v) => {
    ["x", "y", "w", "h"].forEach((n, i) => { inputs[n].value = v ? String(Math.round(v[i])) : ""; });
    draw();
  };
  function draw() {
    const v = tool.value();
    box.hidden = !v || !tool.enabled;
    if (box.hidden) return;
    const ratio = img.getBoundingClientRect().width / size()[0];
    box.style.left = `${v[0] * ratio}px`;
    box.style.top = `${v[1] * ratio}px`;
    box.style.width = `${v[2] * ratio}px`;
    box.style.height = `${v[3] * ratio}px`;
  }
  tool.draw = draw;
  area.addEventListener("pointerdown", (e) => {
    if (!tool.enabled || !img.naturalWidth) return;
    e.preventDefault();
    start = point(e);
    area.setPointerCapture(e.pointerId);
  });
  area.addEventListener("pointermove", (e) => {
    if (!start) return;
    const p = point(e);
    tool.set([Math.min(start[0], p[0]), Math.min(start[1], p[1]),
              Math.abs(p[0] - start[0]), Math.abs(p[1] - start[1])]);
  });
  const stop = () => { start = null; };
  area.addEventListener("pointerup", stop);
  area.addEventListener("pointercancel", stop);
  img.addEventListener("load", draw);
  return tool;
}

function valueText(value) {
  if (value === null || value === undefined || value === "") return "—";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function addField(list, name, value) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = name;
  dd.textContent = valueText(value);
  list.append(dt, dd);
}

function labelText(label) {
  if (typeof label !== "object" || label === null) return String(label);
  const extra = [label.source, typeof label.score === "number" ? label.score.toFixed(3) : null]
    .filter((x) => x !== null && x !== undefined);
  return `${label.label}${extra.length ? " (" + extra.join(", ") + ")" : ""}`;
}

async function openDetail(id, from) {
  detailId = id;
  detailFrom = from || null;
  const panel = $("detail");
  panel.hidden = false;
  $("detail-title").textContent = `Image #${id}`;
  $("detail-img").alt = `preview of image ${id}`;
  $("detail-img").src = at(`/images/${id}/preview`);
  $("detail-meta").replaceChildren();
  $("detail-message").textContent = "";
  showDetailRegion(false);
  detailRegion.set(null);
  $("detail-close").focus();
  try {
    const row = await getJSON(`/images/${id}`);
    if (detailId !== id) return;   // another result was opened meanwhile
    const list = $("detail-meta");
    const field = (key, value) => {
      if (key === "labels" && Array.isArray(value)) {
        addField(list, "labels", value.length ? value.map(labelText).join("; ") : "none");
      } else {
        addField(list, key, value);
      }
    };
    for (const [key, value] of Object.entries(row)) {
      if (key === "metadata" && value && typeof value === "object") {
        for (const [name, v] of Object.entries(value)) field(name, v);
      } else {
        field(key, value);
      }
    }
  } catch (err) {
    $("detail-message").textContent = err.message;
  }
}

function closeDetail() {
  const panel = $("detail");
  if (panel.hidden) return;
  panel.hidden = true;
  detailId = null;
  if (detailFrom && document.body.contains(detailFrom)) detailFrom.focus();
  detailFrom = null;
}

function showDetailRegion(on) {
  detailRegion.enabled = on;
  $("detail-region-tools").hidden = !on;
  $("detail-region").setAttribute("aria-expanded", String(on));
  $("detail-area").classList.toggle("drawing", on);
  detailRegion.draw();
}

function similarToDetail() {
  go({ ...formState(), mode: "similar", id: String(detailId) });
}

function regionSearch() {
  const box = detailRegion.value();
  if (!box) { $("detail-message").textContent = "Drag a box on the preview first (or type x, y, w, h)."; return; }
  go({ ...formState(), mode: "similar", id: String(detailId), region: box.join(","), rs: "preview" });
}

async function addToCohort() {
  const name = $("detail-cohort-name").value.trim();
  if (!name) { $("detail-message").textContent = "Give the cohort a name."; return; }
  try {
    const response = await fetch(at(`/cohorts/${encodeURIComponent(name)}/add`), {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ids: [detailId] }) });
    const cohort = await (await checked(response)).json();
    $("detail-message").textContent = `Added to cohort ${cohort.name} (${cohort.count} images).`;
  } catch (err) {
    $("detail-message").textContent = err.message;
  }
}

// An uploaded PNG/JPEG is shown so that a region of it can be searched, in its own pixels
// (browsers cannot draw DICOM: such a file's region is searched from its indexed copy's panel).
function showUploadRegion(file) {
  hideUploadRegion();
  if (!features.region || !/^image\/(png|jpeg|gif|webp|bmp)$/.test(file.type || "")) return;
  uploadURL = URL.createObjectURL(file);
  $("upload-img").src = uploadURL;
  uploadRegion.set(null);
  uploadRegion.enabled = true;
  $("upload-region").hidden = false;
}

function hideUploadRegion() {
  if (uploadURL) URL.revokeObjectURL(uploadURL);
  uploadURL = null;
  $("upload-region").hidden = true;
  $("upload-img").removeAttribute("src");
}

function uploadRegionSearch() {
  const box = uploadRegion.value();
  if (!box || !imageFile) { showError("Drag a box on the uploaded image first (or type x, y, w, h)."); return; }
  const state = { ...formState(), mode: "upload", region: box.join(","), rs: "image" };
  const text = $("query").value.trim();
  if (text) state.q = text;
  go(state);
}

function initDetail() {
  detailRegion = regionTool($("detail-area"), $("detail-region-inputs"));
  uploadRegion = regionTool($("upload-area"), $("upload-region-inputs"));
  $("detail-close").addEventListener("click", closeDetail);
  $("detail-similar").addEventListener("click", similarToDetail);
  $("detail-region").addEventListener("click", () => showDetailRegion(!detailRegion.enabled));
  $("detail-region-run").addEventListener("click", regionSearch);
  $("detail-cohort-add").addEventListener("click", addToCohort);
  $("upload-region-run").addEventListener("click", uploadRegionSearch);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !$("detail").hidden) closeDetail();
  });
}
