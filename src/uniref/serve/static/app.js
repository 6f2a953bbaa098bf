// The UniRef page: K references (ordered; each is "picture i"), the SELF plan before running, one edit
// call to POST v1/images/edits, the result and, when the model records it, the per-reference attention.
// Plain JS with no dependencies, so the page works offline and needs no build step. API paths are
// relative, so the page also works behind a reverse proxy under a prefix such as /uniref/.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { refs: [], info: null, planSeq: 0 };

function headers() {
  const key = $("api-key").value.trim();
  sessionStorage.setItem("uniref-api-key", key);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, body) {
  const res = await fetch(path, { method: body ? "POST" : "GET", body, headers: headers() });
  const data = await res.json().catch(() => ({ error: { message: `${res.status} ${res.statusText}` } }));
  if (!res.ok) throw new Error((data.error && data.error.message) || `${res.status} ${res.statusText}`);
  return data;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

function formWithImages() {
  const form = new FormData();
  for (const ref of state.refs) form.append("image", ref.file, ref.file.name);
  for (const name of ["budget", "mode"]) {
    const value = $(name).value.trim();
    if (value) form.append(name, value);
  }
  return form;
}

function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/") && file.type !== "") continue;
    state.refs.push({ file, url: URL.createObjectURL(file) });
  }
  render();
}

function move(i, delta) {
  const j = i + delta;
  if (j < 0 || j >= state.refs.length) return;
  [state.refs[i], state.refs[j]] = [state.refs[j], state.refs[i]];
  render();
}

function remove(i) {
  URL.revokeObjectURL(state.refs[i].url);
  state.refs.splice(i, 1);
  render();
}

function button(text, title, onClick, disabled) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.title = title;
  b.disabled = disabled;
  b.addEventListener("click", onClick);
  return b;
}

function render() {
  const list = $("refs");
  list.replaceChildren();
  state.refs.forEach((ref, i) => {
    const li = document.createElement("li");
    li.dataset.testid = "ref";
    const img = document.createElement("img");
    img.src = ref.url;
    img.alt = `picture ${i + 1}`;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `picture ${i + 1}`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = ref.file.name;
    li.append(img, label, name,
      button("↑", "move up", () => move(i, -1), i === 0),
      button("↓", "move down", () => move(i, 1), i === state.refs.length - 1),
      button("✕", "remove", () => remove(i), false));
    list.append(li);
  });
  $("run").disabled = state.refs.length === 0;
  updatePlan();
}

async function updatePlan() {
  const seq = ++state.planSeq;
  const box = $("plan");
  if (state.refs.length === 0) { box.replaceChildren(); return; }
  try {
    const plan = await api("v1/plan", formWithImages());
    if (seq !== state.planSeq) return;  // a newer plan request is on its way
    showError("");
    box.replaceChildren();
    const title = document.createElement("h2");
    title.textContent = `SELF plan (${plan.mode}): ${plan.total_tokens} of ${plan.token_cap} tokens`;
    box.append(title);
    plan.images.forEach((im, i) => {
      const row = document.createElement("div");
      row.className = "row";
      row.dataset.testid = "plan-row";
      const share = plan.token_cap ? im.tokens / plan.token_cap : 0;
      const meter = document.createElement("div");
      meter.className = "meter";
      meter.title = `${(100 * share).toFixed(0)} % of the budget`;
      const fill = document.createElement("div");
      fill.style.width = `${Math.min(100, 100 * share).toFixed(1)}%`;
      meter.append(fill);
      const label = document.createElement("span");
      label.textContent = `picture ${i + 1}`;
      const text = document.createElement("span");
      text.className = "muted";
      text.textContent = `${im.width}×${im.height} → ${im.planned_width}×${im.planned_height}, ${im.tokens} tok`;
      row.append(label, meter, text);
      box.append(row);
    });
    const cap = document.createElement("div");
    cap.className = "muted";
    cap.textContent = `budget ${plan.budget_pixels.toLocaleString()} px (cap ${plan.token_cap} tokens), sides multiples of ${plan.multiple}`;
    box.append(cap);
  } catch (err) {
    if (seq === state.planSeq) { box.replaceChildren(); showError(err.message); }
  }
}

async function run() {
  const form = formWithImages();
  form.append("prompt", $("prompt").value);
  form.append("n", "1");
  form.append("response_format", "b64_json");
  for (const name of ["steps", "guidance", "seed", "size"]) {
    const value = $(name).value.trim();
    if (value) form.append(name, value);
  }
  if (state.info && state.info.attention) form.append("attention", "true");
  showError("");
  $("run").disabled = true;
  $("progress").hidden = false;
  const start = performance.now();
  const timer = setInterval(() => { $("elapsed").textContent = `${((performance.now() - start) / 1000).toFixed(1)} s`; }, 100);
  try {
    const out = await api("v1/images/edits", form);
    const src = `data:image/png;base64,${out.data[0].b64_json}`;
    $("result-img").src = src;
    $("download").href = src;
    const s = out.uniref.seconds;
    $("timings").textContent = `${out.uniref.width}×${out.uniref.height}, ${s.total.toFixed(2)} s (batch of ${out.uniref.batch_size})`;
    $("result").hidden = false;
    showAttention(out.uniref.attention ? out.uniref.attention[0] : null);
  } catch (err) {
    showError(err.message);
  } finally {
    clearInterval(timer);
    $("progress").hidden = true;
    $("run").disabled = state.refs.length === 0;
  }
}

function showAttention(summary) {
  const box = $("attention");
  box.replaceChildren();
  box.hidden = !summary;
  if (!summary) return;
  const title = document.createElement("h2");
  title.textContent = "Attention per reference";
  box.append(title);
  for (const ref of summary.references) {
    const row = document.createElement("div");
    row.className = "row";
    const meter = document.createElement("div");
    meter.className = "meter";
    const fill = document.createElement("div");
    fill.style.width = `${(100 * ref.share).toFixed(1)}%`;
    meter.append(fill);
    const label = document.createElement("span");
    label.textContent = `picture ${ref.picture}`;
    const text = document.createElement("span");
    text.className = "muted";
    text.textContent = `${(100 * ref.share).toFixed(0)} %`;
    row.append(label, meter, text);
    box.append(row);
  }
  const line = document.createElement("p");
  line.className = "muted";
  line.dataset.testid = "attention-summary";
  line.textContent = summary.summary;
  box.append(line);
}

async function init() {
  $("api-key").value = sessionStorage.getItem("uniref-api-key") || "";
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files); });
  $("file-input").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  $("run").addEventListener("click", run);
  for (const name of ["budget", "mode"]) $(name).addEventListener("change", updatePlan);
  $("api-key").addEventListener("change", () => { loadModel(); updatePlan(); });
  await loadModel();
}

async function loadModel() {
  try {
    const models = await api("v1/models");
    const model = models.data[0];
    state.info = model.uniref;
    $("model-name").textContent = `model ${model.id}: native budget ${Math.round(Math.sqrt(state.info.ref_budget))}², ${state.info.default_steps} steps`;
    $("steps").placeholder = String(state.info.default_steps);
    $("guidance").placeholder = String(state.info.default_guidance);
    showError("");
  } catch (err) {
    $("model-name").textContent = "not connected";
    showError(err.message);
  }
}

init();
