// hematoscope web page: upload, results grid, differential chart, corrections, history.
// Plain browser JavaScript (no build step, no network beyond this server).
"use strict";

const TOKEN_KEY = "hematoscope.token";
const PALETTE = ["#6d28d9", "#db2777", "#0891b2", "#ea580c", "#16a34a", "#ca8a04", "#4f46e5",
                 "#dc2626", "#0d9488", "#9333ea", "#65a30d", "#475569"];
const $ = (sel) => document.querySelector(sel);

const state = { models: [], analysis: null, showHeat: false, heatOverride: new Map(), canAdapt: false };

// ---------- helpers ---------------------------------------------------------------------
function display(label) {
  if (!label) return "";
  const s = label.replace(/_/g, " ");
  return s.charAt(0).toUpperCase() + s.slice(1);
}

function colorOf(label) {
  const labels = state.analysis ? state.analysis.labels : [];
  const i = Math.max(0, labels.indexOf(label));
  return PALETTE[i % PALETTE.length];
}

function pct(x) { return `${(100 * x).toFixed(1)}%`; }
function fileCount(n) { return `${n} file${n > 1 ? "s" : ""}`; }

function setStatus(text, kind = "", where = "#status") {
  const el = $(where);
  el.textContent = text;
  el.className = `status ${kind}`;
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (_) { /* not JSON */ }
    if (response.status === 401) detail = "this server needs an API token: enter it at the top right";
    const err = new Error(detail);  // the server's words; the status code stays on err.status
    err.status = response.status;
    throw err;
  }
  return response;
}

function svgEl(name, attrs = {}, text = null) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== null) el.textContent = text;
  return el;
}

// ---------- tabs ------------------------------------------------------------------------
function selectTab(name) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const on = tab.id === `tab-${name}`;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    document.getElementById(tab.getAttribute("aria-controls")).hidden = !on;
  }
  if (name === "history") loadHistory();
}

function initTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab) => {
    tab.addEventListener("click", () => selectTab(tab.id.slice(4)));
    tab.addEventListener("keydown", (ev) => {
      if (ev.key !== "ArrowRight" && ev.key !== "ArrowLeft") return;
      const shown = tabs.filter((t) => !t.hidden);  // Adapt shows only where the server allows it
      const at = shown.indexOf(tab);
      const next = shown[(at + (ev.key === "ArrowRight" ? 1 : shown.length - 1)) % shown.length];
      next.focus();
      selectTab(next.id.slice(4));
    });
  });
}

// ---------- models and token ------------------------------------------------------------
async function loadModels() {
  const select = $("#model-select");
  try {
    const body = await (await api("/api/models")).json();
    state.models = body.data;
    select.replaceChildren(...body.data.map((m) => {
      const adapted = m.adapted_to ? `, adapted to ${m.adapted_to}` : "";
      const opt = new Option(`${m.name} (${m.kind}${adapted})`, m.name, m.default, m.default);
      const among = m.answerable_classes && m.answerable_classes.length < m.labels.length
        ? `; answers among ${m.answerable_classes.join(", ")}` : "";
      opt.title = `${m.labels.length} classes, explanation: ${m.explanation}${among}`;
      return opt;
    }));
    if (!$("#status").textContent.startsWith("Classif")) setStatus("");
    fillOodSelect();
    state.canAdapt = body.can_adapt;
    $("#tab-adapt").hidden = !body.can_adapt;
    if (body.can_adapt) fillAdaptForm();
  } catch (err) {
    setStatus(`Cannot list models: ${err.message}`, "error");
  }
}

// Whose cells an operating point's share counts: an adapted model's levels were set on the held-out
// crops of the lab it was adapted to, not on the training lab's validation cells.
function passWhose(model) {
  return model && model.adapted_to ? "of the adapted lab's held-out crops pass" : "of training-lab cells pass";
}

// The flag's operating points the chosen model offers for one analysis (GET /api/models).
function fillOodSelect() {
  const select = $("#ood-select");
  const previous = select.value;
  const model = state.models.find((m) => m.name === $("#model-select").value);
  const levels = (model && model.ood_accept_levels) || [];
  const served = model && model.ood_accept != null ? ` (${pct(model.ood_accept)} pass)` : "";
  // a server started with --ood-accept moved the flag: offer it as fitted too
  const fitted = served && levels.length ? [new Option("as fitted", "fitted")] : [];
  select.replaceChildren(new Option(`as the model is served${served}`, ""), ...fitted,
    ...levels.map((q) => new Option(`${pct(q)} ${passWhose(model)}`, String(q))));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  $("#ood-label").hidden = levels.length === 0;
}

// ---------- adapt -----------------------------------------------------------------------
function fillAdaptForm() {
  const base = $("#adapt-base");
  const previous = base.value;
  const adaptable = state.models.filter((m) => m.adaptable);
  base.replaceChildren(...adaptable.map((m) => new Option(m.name, m.name, m.default, m.default)));
  if (adaptable.some((m) => m.name === previous)) base.value = previous;
  const model = adaptable.find((m) => m.name === base.value) || adaptable[0];
  const checked = new Set([...document.querySelectorAll("#adapt-classes input:checked")].map((c) => c.value));
  $("#adapt-classes").replaceChildren(...model.labels.map((lab) => {
    const label = Object.assign(document.createElement("label"), { className: "check" });
    const box = Object.assign(document.createElement("input"), { type: "checkbox", value: lab });
    box.checked = checked.has(lab);
    label.append(box, ` ${display(lab)}`);
    return label;
  }));
  syncTune();
  const removable = state.models.filter((m) => m.removable);
  $("#adapt-list").hidden = removable.length === 0;
  $("#adapt-models").replaceChildren(...removable.map((m) => {
    const li = document.createElement("li");
    const text = Object.assign(document.createElement("span"), { textContent: `${m.name} · adapted to ${m.adapted_to}` });
    const remove = Object.assign(document.createElement("button"), {
      type: "button", className: "button small-button danger", textContent: "Delete" });
    remove.setAttribute("aria-label", `Delete model ${m.name}`);
    remove.addEventListener("click", () => removeModel(m.name));
    li.append(text, remove);
    return li;
  }));
}

async function removeModel(name) {
  if (!window.confirm(`Delete the model ${name}? It is no longer served and its files are removed; ` +
                      "analyses made with it stay in the history.")) return;
  try {
    await api(`/api/models/${encodeURIComponent(name)}`, { method: "DELETE" });
    await loadModels();
    setAdaptStatus(`Deleted model ${name}.`, "ok");
  } catch (err) {
    setAdaptStatus(`Not deleted: ${err.message}.`, "error");
  }
}

function syncTune() {
  const on = $("#adapt-tune").checked;
  $("#adapt-classes").setAttribute("aria-disabled", String(!on));
  for (const box of document.querySelectorAll("#adapt-classes input")) box.disabled = !on;
}

async function adapt(ev) {
  ev.preventDefault();
  const files = [...$("#adapt-files").files];
  const name = $("#adapt-name").value.trim();
  if (!files.length) { setAdaptStatus("Choose your lab's crops first (images or a zip).", "error"); return; }
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  form.append("name", name);
  form.append("base", $("#adapt-base").value);
  form.append("source", $("#adapt-source").value.trim());
  if ($("#adapt-tune").checked) {
    const classes = [...document.querySelectorAll("#adapt-classes input:checked")].map((c) => c.value);
    if (classes.length < 2) { setAdaptStatus("Tuning needs at least two classes your crops hold.", "error"); return; }
    form.append("tune", "true");
    form.append("classes", classes.join(","));
  }
  setAdaptStatus(`Adapting ${$("#adapt-base").value} to ${fileCount(files.length)}…`, "busy");
  $("#adapt-go").disabled = true;
  try {
    const result = await (await api("/api/models/adapt", { method: "POST", body: form })).json();
    await loadModels();
    $("#model-select").value = result.model.name;
    fillOodSelect();
    const skipped = result.skipped.length ? ` ${result.skipped.length} file(s) could not be read.` : "";
    setAdaptStatus(`${result.model.name} is ready: adapted on ${result.images} crops in ${Math.round(result.seconds)} s` +
      (result.accepted_after != null ? `; its unlike-training flag passes ${pct(result.accepted_after)} of your ` +
        `held-out crops (the original model: ${pct(result.accepted_before)})` : "") +
      (result.class_mix ? `; tuned towards the class mix it estimated for your crops: ` +
        Object.entries(result.class_mix).sort((a, b) => b[1] - a[1]).map(([c, v]) => `${c} ${pct(v)}`).join(", ") : "") +
      `. It is chosen under Model for your next analysis.${skipped}`, "ok");
    $("#adapt-files").value = "";
    $("#adapt-chosen").textContent = "no crops chosen";
  } catch (err) {
    setAdaptStatus(`Not adapted: ${err.message}.`, "error");
  } finally {
    $("#adapt-go").disabled = false;
  }
}

function setAdaptStatus(text, kind = "") {
  setStatus(text, kind, "#adapt-status");
}

function initAdapt() {
  $("#adapt-form").addEventListener("submit", adapt);
  $("#adapt-tune").addEventListener("change", syncTune);
  $("#adapt-base").addEventListener("change", fillAdaptForm);
  $("#adapt-files").addEventListener("change", (ev) => {
    const n = ev.target.files.length;
    $("#adapt-chosen").textContent = n ? `${fileCount(n)} chosen` : "no crops chosen";
  });
}

function initToken() {
  const input = $("#token-input");
  input.value = localStorage.getItem(TOKEN_KEY) || "";
  input.addEventListener("change", () => {
    const v = input.value.trim();
    if (v) localStorage.setItem(TOKEN_KEY, v); else localStorage.removeItem(TOKEN_KEY);
    loadModels();
  });
}

// ---------- upload ----------------------------------------------------------------------
async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const sample = $("#sample-input").value.trim();
  if (sample) form.append("sample", sample);
  const params = new URLSearchParams({ top_k: "3", gradcam: String($("#gradcam-input").checked) });
  const model = $("#model-select").value;
  if (model) params.set("model", model);
  const accept = $("#ood-label").hidden ? "" : $("#ood-select").value;
  if (accept) params.set("ood_accept", accept);
  const zips = files.filter((f) => /\.zip$/i.test(f.name)).length;  // a zip holds many cells
  const parts = [files.length > zips ? fileCount(files.length - zips) : "", zips ? `${zips} zip${zips > 1 ? "s" : ""}` : ""];
  setStatus(`Classifying ${zips ? "the cells in " : ""}${parts.filter(Boolean).join(" and ")}…`, "busy");
  $("#dropzone").classList.add("busy");
  try {
    const analysis = await (await api(`/api/predict?${params}`, { method: "POST", body: form })).json();
    state.showHeat = false;  // cells first; overlays on demand
    showAnalysis(analysis);
    $("#sample-input").value = "";  // stored with this analysis; the next upload is likely another sample
    const n = analysis.n_images - analysis.n_errors;
    setStatus(`Classified ${n} image${n === 1 ? "" : "s"}` +
              (analysis.n_errors ? `; ${analysis.n_errors} file(s) could not be read.` : "."), "ok");
  } catch (err) {
    // the results still on screen are the previous analysis: say so, not only that this one failed
    const before = state.analysis ? " The results below are from your previous analysis." : "";
    setStatus(`Nothing was classified: ${err.message}.${before}`, "error");
  } finally {
    $("#dropzone").classList.remove("busy");
    $("#file-input").value = "";
  }
}

function initUpload() {
  const zone = $("#dropzone");
  $("#file-input").addEventListener("change", (ev) => upload([...ev.target.files]));
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, (ev) => { ev.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (ev) => upload([...ev.dataTransfer.files]));
}

// ---------- results ---------------------------------------------------------------------
function showAnalysis(analysis) {
  state.analysis = analysis;
  state.heatOverride = new Map();
  $("#results").hidden = false;
  $("#heatmap-toggle").checked = state.showHeat;
  $("#heatmap-toggle").disabled = !analysis.items.some((it) => it.heatmap);
  const when = new Date(analysis.created).toLocaleString();
  const files = `${analysis.n_images} file${analysis.n_images === 1 ? "" : "s"} analysed`;
  $("#result-title").textContent = analysis.sample ? `${analysis.sample} · ${files}` : files;
  $("#result-sample").value = analysis.sample || "";
  const flag = analysis.model.ood_accept != null
    ? ` · unfamiliar-cell flag moved: ${pct(analysis.model.ood_accept)} ` +
      passWhose(state.models.find((m) => m.name === analysis.model.name)) : "";
  $("#result-meta").textContent = `${when} · model ${analysis.model.name} (${analysis.model.kind}, ` +
    `id ${analysis.model.id})${flag} · analysis ${analysis.id.slice(0, 8)}`;

  const filter = $("#filter-select");
  const previous = filter.value;
  const present = new Set(analysis.items.filter((it) => !it.error).map((it) => it.prediction));
  const options = [new Option("all images", "all")];
  for (const label of analysis.labels) {
    if (present.has(label)) options.push(new Option(display(label), `class:${label}`));
  }
  options.push(new Option("abstained or unusual", "flagged"), new Option("corrected", "corrected"));
  filter.replaceChildren(...options);
  filter.value = options.some((o) => o.value === previous) ? previous : "all";

  drawChart();
  showLabHint(analysis);
  renderGrid();
  const errors = analysis.items.filter((it) => it.error);
  $("#errors").hidden = errors.length === 0;
  $("#error-list").replaceChildren(...errors.map((it) => {
    const li = document.createElement("li");
    const name = document.createElement("strong");
    name.textContent = it.source;
    li.append(name, `: ${it.error}`);
    return li;
  }));
}

// As `hematoscope predict` says it: when at least a fifth of at least 20 cells look unlike the
// training data, they are most likely another lab's crops, and adapting the model is the remedy.
const LAB_HINT_SHARE = 0.2, LAB_HINT_MIN = 20;

function showLabHint(analysis) {
  const hint = $("#lab-hint");
  const read = analysis.items.filter((it) => !it.error);
  const unlike = read.filter((it) => it.abstain && it.abstain_reason === "unlike training data").length;
  const model = state.models.find((m) => m.name === analysis.model.name);
  hint.hidden = read.length < LAB_HINT_MIN || unlike < LAB_HINT_SHARE * read.length || Boolean(model && model.adapted_to);
  if (hint.hidden) return;
  const code = (text) => Object.assign(document.createElement("code"), { textContent: text });
  const adapted = state.models.filter((m) => m.adapted_to);
  const lead = `${unlike} of ${read.length} cells (${pct(unlike / read.length)}) look unlike this model's training ` +
    "data and were set aside. If they come from your lab's own microscope, camera or stain, adapt the model to a " +
    "few hundred of your unlabelled crops";
  const levels = (model && model.ood_accept_levels) || [];
  const loosest = levels.length ? Math.max(...levels) : null;
  const looser = loosest != null && (analysis.model.ood_accept == null || analysis.model.ood_accept < loosest)
    ? ` Without adapting, a looser unfamiliar-cell flag (the menu beside "Choose images"; up to ${pct(loosest)} of ` +
      "training-lab cells pass) sets fewer of them aside, at the price of more wrong answers among them and " +
      "more damaged cells let through." : "";
  const served = (adapted.length
    ? ` Served already: ${adapted.map((m) => `${m.name} (adapted to ${m.adapted_to})`).join(", ")}.` : "") + looser;
  if (state.canAdapt) {
    const link = Object.assign(document.createElement("a"), { href: "#", textContent: "in the Adapt tab" });
    link.addEventListener("click", (ev) => { ev.preventDefault(); selectTab("adapt"); $("#tab-adapt").focus(); });
    hint.replaceChildren(`${lead} `, link, `, then pick the new model under Model.${served}`);
  } else {
    hint.replaceChildren(`${lead} (`, code("hematoscope adapt default CROPS/ --out my-lab"), "), serve it next to " +
      "this one (", code("hematoscope serve --model default --model my-lab"), ") and pick it under Model." +
      `${served} docs/crosslab.md gives the measured numbers.`);
  }
}

function drawChart() {
  const a = state.analysis;
  const diff = a.corrected_differential || a.differential;
  const rows = diff.classes;
  // drawn at the box's own width (redrawn on resize), so the labels keep their size on a phone
  const width = Math.max(300, Math.min(640, $("#chart").clientWidth || 640));
  const rowH = 26, labelW = width < 480 ? 118 : 170, valueW = width < 480 ? 78 : 90, top = 4;
  const barMax = width - labelW - valueW;
  const height = top + rows.length * rowH + 4;
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img",
                              "aria-labelledby": "chart-title chart-desc", class: "chart" });
  svg.append(svgEl("title", { id: "chart-title" }, "Differential count, percent per class"));
  svg.append(svgEl("desc", { id: "chart-desc" },
    rows.map((r) => `${display(r.label)} ${r.count} (${r.percent.toFixed(1)}%)`).join(", ")));
  const maxPct = Math.max(1, ...rows.map((r) => r.percent));
  rows.forEach((r, i) => {
    const y = top + i * rowH;
    const g = svgEl("g", { class: "bar-row", "data-label": r.label });
    g.append(svgEl("text", { x: labelW - 10, y: y + rowH / 2 + 5, "text-anchor": "end", class: "bar-label" },
                   display(r.label)));
    g.append(svgEl("rect", { x: labelW, y: y + 4, width: barMax, height: rowH - 8, rx: 4, class: "bar-track" }));
    const w = (barMax * r.percent) / maxPct;
    g.append(svgEl("rect", { x: labelW, y: y + 4, width: Math.max(w, r.count ? 2 : 0), height: rowH - 8,
                             rx: 4, fill: colorOf(r.label), class: "bar" }));
    g.append(svgEl("text", { x: labelW + barMax + 8, y: y + rowH / 2 + 5, class: "bar-value" },
                   `${r.percent.toFixed(1)}%  (${r.count})`));
    svg.append(g);
  });
  $("#chart").replaceChildren(svg);
  $("#chart-note").textContent = a.corrected_differential
    ? "Includes your corrections." : "Percent of classified cells.";
  const unusual = a.items.filter((it) => !it.error && it.ood_flag).length;
  const stats = [["Counted", diff.classified], ["Abstained", diff.abstained], ["Unusual", unusual],
                 ["Unreadable", diff.skipped], ["Total", diff.total]];
  $("#stats").replaceChildren(...stats.flatMap(([name, value]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = value;
    if (name === "Abstained" && diff.abstained) {
      dd.title = Object.entries(diff.abstain_reasons).map(([k, v]) => `${v} ${k}`).join(", ");
    }
    return [dt, dd];
  }));
}

function visibleItems() {
  const a = state.analysis;
  const f = $("#filter-select").value;
  let items = a.items.filter((it) => !it.error);
  if (f.startsWith("class:")) items = items.filter((it) => it.prediction === f.slice(6));
  else if (f === "flagged") items = items.filter((it) => it.abstain || it.ood_flag);
  else if (f === "corrected") items = items.filter((it) => it.correction);
  const sort = $("#sort-select").value;
  const byConf = (x, y) => x.confidence - y.confidence;
  if (sort === "conf-asc") items.sort(byConf);
  else if (sort === "conf-desc") items.sort((x, y) => byConf(y, x));
  else if (sort === "class") {
    items.sort((x, y) => a.labels.indexOf(x.prediction) - a.labels.indexOf(y.prediction) || byConf(y, x));
  }
  return items;
}

function badge(text, kind, title) {
  const b = document.createElement("span");
  b.className = `badge ${kind}`;
  b.textContent = text;
  if (title) b.title = title;
  return b;
}

// The anomaly score as a multiple of the model's flag threshold (raw when the model is not served).
function anomalyText(score, limit) {
  if (score === null || score === undefined) return "";
  // the limit that decided this cell's flag (per view count and operating point); older analyses lack it
  const model = state.models.find((m) => m.name === state.analysis.model.name);
  const threshold = limit != null ? Number(limit) : model && model.ood ? Number(model.ood.threshold) : NaN;
  if (!(threshold > 0)) return ` · anomaly score ${score.toFixed(2)}`;
  // the score is standardised (it can be negative): below the flag's limit, only "how close" matters
  const share = score / threshold;
  return share <= 0.5 ? " · looks like the training data" : share < 1 ? ` · unusual: ${Math.round(share * 100)} % of the flag limit`
    : ` · unusual: ${share.toFixed(1)}× the flag limit`;
}

// ---------- one cell at full size ------------------------------------------------------------
// The thumbnail shows at once; the stored full-size image (fetched with the token) replaces it.
// The heatmap likewise: the card's, then the one drawn over the full-size image where stored.
let cellUrl = null, heatUrl = null;

// A stored picture of the open cell (image or heatmap) as an object URL; null when the dialog
// was closed or moved to another cell meanwhile.
async function cellPictureUrl(it, what) {
  const blob = await (await api(`/api/analyses/${state.analysis.id}/items/${it.index}/${what}`)).blob();
  const dialog = $("#cell-dialog");
  return dialog.open && dialog.dataset.index === String(it.index) ? URL.createObjectURL(blob) : null;
}

async function showCellHeatmap(it) {
  const view = $("#cell-view");
  view.src = heatUrl || it.heatmap;
  if (heatUrl || !it.heatmap_full) return;
  try {
    heatUrl = await cellPictureUrl(it, "heatmap");
    if (heatUrl && $("#cell-heat").checked) view.src = heatUrl;
  } catch (err) {
    $("#cell-status").textContent = `Only the thumbnail's heatmap is available: ${err.message}`;
  }
}

async function openCell(it) {
  const dialog = $("#cell-dialog"), view = $("#cell-view"), heat = $("#cell-heat");
  dialog.dataset.index = String(it.index);
  const answer = it.correction ? `${display(it.correction.label)} (corrected)`
    : it.abstain ? `set aside (best guess ${display(it.prediction)})` : display(it.prediction);
  $("#cell-caption").textContent = `${it.source} · ${answer} · confidence ${pct(it.confidence)}`;
  $("#cell-heat-label").hidden = !it.heatmap;
  const outlines = it.explanation && it.explanation.method === "segmentation";
  $("#cell-heat-name").textContent = outlines ? "Outlines" : "Heatmap";
  $("#cell-heat-note").hidden = Boolean(it.heatmap_full);
  heat.checked = false;
  if (heatUrl) URL.revokeObjectURL(heatUrl);
  heatUrl = null;
  heat.onchange = () => { if (heat.checked) showCellHeatmap(it); else view.src = cellUrl || it.thumbnail; };
  view.alt = it.source;
  view.src = it.thumbnail;
  $("#cell-status").textContent = "loading the full-size image…";
  if (!dialog.open) dialog.showModal();
  try {
    const url = await cellPictureUrl(it, "image");
    if (!url) return;  // closed or another cell meanwhile
    if (cellUrl) URL.revokeObjectURL(cellUrl);
    cellUrl = url;
    if (!heat.checked) view.src = cellUrl;
    $("#cell-status").textContent = "";
  } catch (err) {
    $("#cell-status").textContent = `Only the thumbnail is available: ${err.message}`;
  }
}

function closeCell() {
  if (cellUrl) URL.revokeObjectURL(cellUrl);
  if (heatUrl) URL.revokeObjectURL(heatUrl);
  cellUrl = heatUrl = null;
  $("#cell-view").removeAttribute("src");
}

function renderCard(it) {
  const a = state.analysis;
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  node.dataset.index = it.index;
  node.dataset.prediction = it.prediction;
  if (it.abstain) node.classList.add("abstained");
  const img = node.querySelector("img");
  const heatBtn = node.querySelector(".heat-btn");
  const heatOn = state.heatOverride.has(it.index) ? state.heatOverride.get(it.index) : state.showHeat;
  const useHeat = Boolean(it.heatmap) && heatOn;
  img.src = useHeat ? it.heatmap : it.thumbnail;
  img.alt = `${it.source}${useHeat ? " with heatmap" : ""}`;
  if (it.heatmap) {
    heatBtn.setAttribute("aria-pressed", String(useHeat));
    heatBtn.title = it.explanation && it.explanation.note ? it.explanation.note : "explanation overlay";
    heatBtn.setAttribute("aria-label", `Heatmap for ${it.source}`);
    heatBtn.addEventListener("click", () => {
      state.heatOverride.set(it.index, !useHeat);
      node.replaceWith(renderCard(it));
      document.querySelector(`.card[data-index="${it.index}"] .heat-btn`).focus();
    });
  } else {
    heatBtn.remove();
  }
  img.tabIndex = 0;
  img.setAttribute("role", "button");
  img.title = "Open at full size";
  img.setAttribute("aria-label", `Open ${it.source} at full size`);
  img.addEventListener("click", () => openCell(it));
  img.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); openCell(it); }
  });
  const source = node.querySelector(".source");
  source.textContent = it.source.split("/").pop();
  source.title = it.source;
  const label = node.querySelector(".pred-label");
  if (it.correction) {  // the lab's answer leads; the model's stays visible beside it
    label.textContent = display(it.correction.label);
    label.style.color = colorOf(it.correction.label);
    label.append(Object.assign(document.createElement("span"), {
      className: "model-guess", textContent: ` (model: ${display(it.prediction)})` }));
  } else if (it.abstain) {  // not an answer: it is not counted, so it must not read like one
    label.textContent = "Set aside";
    label.classList.add("set-aside");
    label.append(Object.assign(document.createElement("span"), {
      className: "model-guess", textContent: ` · not counted; best guess ${display(it.prediction)}` }));
  } else {
    label.textContent = display(it.prediction);
    label.style.color = colorOf(it.prediction);
  }
  const badges = node.querySelector(".badges");
  if (it.abstain) badges.append(badge(it.abstain_reason || "abstained", "warn", "not counted in the differential"));
  if (it.ood_flag && it.abstain_reason !== "unlike training data") {
    badges.append(badge("unusual", "warn", `anomaly score ${it.ood_score}`));
  }
  if (it.framing != null && it.framing !== 1) {
    const closer = it.framing < 1;
    badges.append(badge(closer ? `centre ${Math.round(it.framing * 100)} %` : `padded ×${it.framing}`, "info",
      `the crop as the model frames it looked unlike the training data; answered from ${closer ? "its centre" : "a larger frame"} (a share of that framing: the whole crop unless the model was adapted to another)`));
  }
  if (it.recolour) {
    badges.append(badge(it.recolour, "info", "the cell looked unlike the training data in its own colours; answered with this colour change"));
  }
  if (it.correction) badges.append(badge(`corrected: ${display(it.correction.label)}`, "ok"));
  const fill = node.querySelector(".conf-fill");
  fill.style.width = pct(it.confidence);
  fill.style.background = colorOf(it.prediction);
  node.querySelector(".conf-text").textContent = `confidence ${pct(it.confidence)}` + anomalyText(it.ood_score, it.ood_limit);
  node.querySelector(".topk").replaceChildren(...it.top_k.map((t) => {
    const li = document.createElement("li");
    li.textContent = `${display(t.label)} ${pct(t.prob)}`;
    return li;
  }));
  const features = it.explanation && it.explanation.features ? it.explanation.features : [];
  if (features.length) {
    const why = node.querySelector(".why");
    why.hidden = false;
    why.querySelector("ul").replaceChildren(...features.map((f) => {
      const li = document.createElement("li");
      const sign = f.contribution >= 0 ? "+" : "−";
      li.textContent = `${f.name} = ${Number(f.value).toPrecision(3)}${f.unit ? " " + f.unit : ""} ` +
        `(${sign}${Math.abs(f.contribution).toFixed(2)})`;
      li.className = f.contribution >= 0 ? "pos" : "neg";
      return li;
    }));
  }
  const select = node.querySelector(".correct-select");
  select.append(new Option(it.abstain ? "— not counted —" : "— as predicted —", ""));
  for (const lab of a.labels) {
    if (it.abstain || lab !== it.prediction) select.append(new Option(display(lab), lab));
  }
  select.value = it.correction ? it.correction.label : "";
  select.setAttribute("aria-label", `Correct label for ${it.source}`);
  // Arrow keys on a closed select fire "change" at every step: from the keyboard a choice is
  // saved with Enter or on leaving the box, not on each arrow press.
  let keyed = false, saved = false;
  const commit = () => {
    const chosen = select.value || null;
    if (saved || chosen === (it.correction ? it.correction.label : null)) return;
    saved = true;
    saveCorrection(it.index, chosen);
  };
  select.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); commit(); } else if (e.key !== "Tab" && e.key !== "Shift") keyed = true;
  });
  select.addEventListener("change", () => { if (!keyed) commit(); });
  select.addEventListener("blur", () => { if (keyed) commit(); });
  return node;
}

function renderGrid() {
  const items = visibleItems();
  $("#grid").replaceChildren(...items.map(renderCard));
  const ok = state.analysis.items.filter((it) => !it.error).length;
  $("#shown-count").textContent = `${items.length} of ${ok} shown`;
}

async function saveCorrection(index, label) {
  const a = state.analysis;
  try {
    const updated = await (await api(`/api/analyses/${a.id}/corrections`, {
      method: "PATCH",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ corrections: [{ index, label }] }),
    })).json();
    const heat = state.heatOverride;
    showAnalysis(updated);
    state.heatOverride = heat;
    renderGrid();
    document.querySelector(`.card[data-index="${index}"] .correct-select`)?.focus();
    const name = (a.items[index] && a.items[index].source || `image ${index + 1}`).split("/").pop();
    setStatus(label ? `Saved: ${name} is ${display(label)}.` : `Correction removed for ${name}.`, "ok");
  } catch (err) {
    setStatus(`Could not save the correction: ${err.message}`, "error");
  }
}

async function saveSample() {
  const a = state.analysis;
  const input = $("#result-sample");
  const sample = input.value.trim();
  if (!a || sample === (a.sample || "")) return;
  try {
    const updated = await (await api(`/api/analyses/${a.id}`, {
      method: "PATCH",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sample }),
    })).json();
    const heat = state.heatOverride;
    showAnalysis(updated);
    state.heatOverride = heat;
    renderGrid();
    setStatus(sample ? `Sample ID saved: ${sample}.` : "Sample ID removed.", "ok");
  } catch (err) {
    input.value = a.sample || "";
    setStatus(`Could not save the sample ID: ${err.message}`, "error");
  }
}

async function downloadCsv(what = "report") {
  const a = state.analysis;
  try {
    const response = await api(`/api/analyses/${a.id}/${what}.csv`);
    const blob = await response.blob();
    const match = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = match ? match[1] : `hematoscope-${a.id.slice(0, 8)}.csv`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (err) {
    setStatus(`CSV download failed: ${err.message}`, "error");
  }
}

// The browser prints the page through its print style sheet; the title names the PDF a lab saves.
function printReport() {
  const a = state.analysis;
  const before = document.title;
  const day = new Date(a.created).toISOString().slice(0, 10);
  document.title = `hematoscope ${a.sample || "analysis " + a.id.slice(0, 8)} ${day}`;
  try {
    window.print();  // returns when the print dialog closes
  } finally {
    document.title = before;
  }
}

function initResults() {
  $("#filter-select").addEventListener("change", renderGrid);
  $("#sort-select").addEventListener("change", renderGrid);
  $("#cell-dialog").addEventListener("close", closeCell);
  $("#heatmap-toggle").addEventListener("change", (ev) => {
    state.showHeat = ev.target.checked;
    state.heatOverride = new Map();
    renderGrid();
  });
  $("#csv-button").addEventListener("click", () => downloadCsv("report"));
  $("#count-button").addEventListener("click", () => downloadCsv("differential"));
  $("#print-button").addEventListener("click", printReport);
  const sample = $("#result-sample");
  sample.addEventListener("change", saveSample);
  sample.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); saveSample(); } });
}

// ---------- history ---------------------------------------------------------------------
async function loadHistory() {
  const search = $("#history-search").value.trim();
  const params = new URLSearchParams({ limit: "200" });
  if (search) params.set("sample", search);
  try {
    const body = await (await api(`/api/analyses?${params}`)).json();
    $("#history-empty").textContent = search ? `No analysis with a sample ID containing “${search}”.` : "No analyses yet.";
    $("#history-empty").hidden = body.data.length > 0;
    $("#history-more").hidden = body.count <= body.data.length;
    $("#history-more").textContent = `The newest ${body.data.length} of ${body.count} are shown; ` +
      "find older ones by their sample ID.";
    $("#history-body").replaceChildren(...body.data.map((row) => {
      const tr = document.createElement("tr");
      const diff = row.corrected_differential || row.differential;  // the lab's corrections count
      const main = diff.classes.filter((c) => c.count > 0)
        .sort((x, y) => y.count - x.count).slice(0, 3)
        .map((c) => `${display(c.label)} ${c.percent.toFixed(0)}%`).join(", ") +
        (row.corrected_differential ? " (with your corrections)" : "");
      const when = new Date(row.created).toLocaleString();
      const cells = [when, row.sample || "—", row.model.name, row.n_images, row.n_errors, row.n_corrections,
                     main || "—"];
      for (const value of cells) {
        const td = document.createElement("td");
        td.textContent = value;
        tr.append(td);
      }
      const td = document.createElement("td");
      const open = document.createElement("button");
      open.className = "button small-button";
      open.textContent = "Open";
      const what = row.sample ? `sample ${row.sample} (${when})` : `analysis of ${when}`;
      open.setAttribute("aria-label", `Open ${what}`);
      open.addEventListener("click", () => openAnalysis(row.id));
      const del = document.createElement("button");
      del.className = "button small-button danger";
      del.textContent = "Delete";
      del.setAttribute("aria-label", `Delete ${what}`);
      del.addEventListener("click", () => deleteAnalysis(row.id, what));
      td.append(open, del);
      tr.append(td);
      return tr;
    }));
  } catch (err) {
    setStatus(`Cannot load the history: ${err.message}`, "error", "#history-status");
  }
}

async function deleteAnalysis(id, what) {
  if (!window.confirm(`Delete ${what}? Its images, results and corrections are removed for good.`)) return;
  try {
    await api(`/api/analyses/${id}`, { method: "DELETE" });
    if (state.analysis && state.analysis.id === id) {  // what is on the Analyse tab no longer exists
      state.analysis = null;
      $("#results").hidden = true;
    }
    setStatus(`Deleted ${what}.`, "ok", "#history-status");
  } catch (err) {
    setStatus(`Could not delete ${what}: ${err.message}`, "error", "#history-status");
  }
  await loadHistory();
}

async function openAnalysis(id) {
  try {
    const analysis = await (await api(`/api/analyses/${id}`)).json();
    state.showHeat = false;
    selectTab("analyse");
    showAnalysis(analysis);
    setStatus(`Opened analysis ${id.slice(0, 8)}.`, "ok");
    $("#result-title").focus();
  } catch (err) {
    setStatus(`Cannot open the analysis: ${err.message}`, "error");
  }
}

// ---------- start -----------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("#result-title").tabIndex = -1;
  initTabs();
  initToken();
  initUpload();
  initResults();
  initAdapt();
  $("#model-select").addEventListener("change", fillOodSelect);
  $("#ood-select").addEventListener("change", () => {
    if (state.analysis) setStatus("The unfamiliar-cell flag applies to your next upload; the analysis shown " +
                                  "keeps the flag it was made with.", "ok");
  });
  let resized = null;
  window.addEventListener("resize", () => {
    clearTimeout(resized);
    resized = setTimeout(() => { if (state.analysis) drawChart(); }, 150);
  });
  $("#history-refresh").addEventListener("click", loadHistory);
  let searchTimer = null;  // search as the user types, once they pause
  $("#history-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(loadHistory, 250);
  });
  loadModels();
});
