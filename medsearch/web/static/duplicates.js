"use strict";
// The near-copy groups of the store (GET /duplicates), shown as results: each card says its
// group; the highest cosine of the group is its score. Uses app.js (render, current, $, at).

const MAX_GROUPS_SHOWN = 50;

async function showDuplicates() {
  $("status").textContent = "Looking for near-copies…";
  try {
    const started = performance.now();
    const data = await getJSON(`/duplicates?limit=${MAX_GROUPS_SHOWN}`);
    const rows = [];
    data.groups.forEach((group, g) => {
      for (const image of group.images) {
        rows.push({ id: image.id, path: image.path, frame: image.frame, score: group.max_cos,
                    copy_group: g + 1, metadata: {} });
      }
    });
    current = { state: readHash(), request: { kind: "duplicates", label: "near-copies" },
                results: rows, next: null };
    render(rows, `${data.groups_total} group(s) of near-identical images (cosine ≥ ${data.threshold})`
      + (data.groups_total > data.groups.length ? `, first ${data.groups.length} shown` : ""),
      performance.now() - started, false);
  } catch (err) {
    showError(err.message);
  }
}
