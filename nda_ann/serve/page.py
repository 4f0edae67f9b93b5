"""The page served at GET /: drop a generated image (or choose files), see its top proponents with
scores, each one's heatmap over the query, and the estimated mass outside the candidates.
Plain HTML and a little vanilla JS; it loads nothing but this server's own URLs."""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nda-ann: which training images made this?</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1e1e1e; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px; } #info { color: #555; margin-bottom: 16px; }
#drop { border: 2px dashed #888; border-radius: 8px; padding: 28px; text-align: center; background: #fff; cursor: pointer; }
#drop.over { border-color: #2a7; background: #effaf3; }
#controls { margin: 12px 0; display: flex; gap: 16px; flex-wrap: wrap; align-items: center; }
#controls label { color: #444; } #controls input[type=text], #controls input[type=number] { width: 90px; }
#status { margin: 8px 0; min-height: 20px; } #status.error { color: #b00; font-weight: 600; }
.query { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 16px; margin: 16px 0; }
.query h2 { font-size: 17px; margin: 0 0 8px; }
.head { display: flex; gap: 20px; align-items: flex-start; margin-bottom: 12px; }
img.px { image-rendering: pixelated; border: 1px solid #ccc; }
.mass b { font-size: 18px; } .note { color: #666; font-size: 12px; }
.props { display: flex; flex-wrap: wrap; gap: 12px; }
.prop { border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px; width: 262px; background: #fdfdfd; }
.prop .row { display: flex; gap: 8px; align-items: flex-start; }
.prop .score { font-size: 16px; font-weight: 600; font-variant-numeric: tabular-nums; }
.prop .src { font-size: 11px; color: #555; word-break: break-all; }
details { margin-top: 8px; } pre { background: #f4f4f4; padding: 8px; overflow-x: auto; }
</style>
</head>
<body>
<h1>Which training images did this generated image draw on?</h1>
<div id="info">Loading the index summary...</div>
<div id="drop" tabindex="0">Drop a generated image here, or <label for="file"><u>choose files</u></label>
<input id="file" type="file" accept="image/*" multiple hidden></div>
<div id="controls">
<label>timesteps <input id="timesteps" type="text" value="100" title="comma-separated, 0..999"></label>
<label>top <input id="top" type="number" min="1" value="10"></label>
<label>candidates M <input id="candidates" type="number" min="1" placeholder="default"></label>
<label>topk <input id="topk" type="number" min="1" placeholder="all"></label>
</div>
<div id="status"></div>
<div id="results"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (x) => Number(x).toPrecision(4);
const pct = (x) => (100 * x).toFixed(1) + "%";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

async function loadInfo() {
  try {
    const r = await fetch("/info");
    const info = await r.json();
    $("info").textContent = `Index ${info.index_id || info.index}: ${info.images.toLocaleString()} training images of ` +
      `${info.resolution}x${info.resolution}, scales ${info.scales.join(", ")}. Up to ${info.limits.max_files} images per request.`;
    $("timesteps").value = info.defaults.timesteps.join(",");
    $("top").value = info.defaults.top;
    $("top").max = info.limits.max_top;
  } catch (err) {
    $("info").textContent = "Could not read /info: " + err;
  }
}

function proponentCard(p, heatmap) {
  const card = el("div", { class: "prop", "data-image-id": String(p.image_id), "data-rank": String(p.rank) });
  const img = el("img", { class: "px", src: p.image, width: "64", height: "64", alt: "training image #" + p.image_id });
  const text = el("div", {},
    el("div", { class: "rank", text: "#" + p.rank + " \u00b7 image " + p.image_id }),
    el("div", { class: "score", "data-score": String(p.score), text: "score " + fmt(p.score) }),
    el("div", { class: "src", text: p.source }));
  card.append(el("div", { class: "row" }, img, text));
  if (heatmap) card.append(el("img", { class: "heat", src: heatmap, alt: "heatmap of image " + p.image_id + " over the query" }));
  else card.append(el("div", { class: "note", text: "no heatmap kept for this image" }));
  return card;
}

function queryBlock(q, settings) {
  const block = el("div", { class: "query" });
  block.append(el("h2", { text: q.name }));
  const mass = q.outside_mass === null ? el("div", { class: "mass", text: "Outside mass: not estimated in this mode" })
    : el("div", { class: "mass" }, "Estimated mass outside the candidates: ",
         el("b", { class: "outside", "data-outside": String(q.outside_mass), text: pct(q.outside_mass) }));
  const note = el("div", { class: "note", text: `timesteps ${q.timesteps.join(", ")}; the top ${q.top.length} ` +
    "proponents by score (mean over timesteps). Each heatmap shows where on the query that image contributes: " +
    "colour is the share of its score per pixel." });
  block.append(el("div", { class: "head" },
    el("img", { class: "px query-image", src: q.query_image, width: "128", height: "128", alt: "query " + q.name }),
    el("div", {}, mass, note)));
  const props = el("div", { class: "props" });
  for (const p of q.top) props.append(proponentCard(p, q.heatmaps[String(p.image_id)]));
  block.append(props);
  return block;
}

function showResults(data) {
  const out = $("results");
  out.replaceChildren();
  for (const q of data.queries) out.append(queryBlock(q, data.settings));
  const details = el("details", {}, el("summary", { text: "settings" }),
    el("pre", { text: JSON.stringify(data.settings, null, 2) }));
  out.append(details);
}

async function attribute(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("image", f, f.name);
  for (const t of $("timesteps").value.split(/[ ,]+/).filter(Boolean)) form.append("timestep", t);
  for (const k of ["top", "candidates", "topk"]) if ($(k).value) form.append(k, $(k).value);
  setStatus(`Attributing ${files.length} image${files.length > 1 ? "s" : ""}...`, false);
  $("results").setAttribute("aria-busy", "true");
  try {
    const r = await fetch("/attribute", { method: "POST", body: form });
    const data = await r.json().catch(() => ({ error: "the server answered " + r.status }));
    if (!r.ok) { setStatus(`Refused (${r.status}): ${data.error}`, true); return; }
    showResults(data);
    setStatus(`Done in ${data.seconds.toFixed(2)} s against ${data.images.toLocaleString()} training images.`, false);
  } catch (err) {
    setStatus("Request failed: " + err, true);
  } finally {
    $("results").setAttribute("aria-busy", "false");
  }
}

const drop = $("drop");
drop.addEventListener("click", (e) => { if (e.target.tagName !== "LABEL" && e.target.tagName !== "U") $("file").click(); });
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); attribute([...e.dataTransfer.files]); });
$("file").addEventListener("change", (e) => { attribute([...e.target.files]); e.target.value = ""; });
loadInfo();
</script>
</body>
</html>
"""
