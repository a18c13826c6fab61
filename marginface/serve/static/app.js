// The marginface web page: plain DOM calls against the JSON API of the same server.
"use strict";
const $ = (id) => document.getElementById(id);
const picked = { image_a: null, image_b: null };

async function api(method, path, form) {
  const response = await fetch(path, { method, body: form });
  let body;
  try { body = await response.json(); } catch (e) { body = { error: `HTTP ${response.status}` }; }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  Object.assign(node, attrs || {});
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- tabs
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => {
  document.querySelectorAll("nav button, section").forEach((x) => x.classList.remove("on"));
  b.classList.add("on");
  $(b.dataset.tab).classList.add("on");
  if (b.dataset.tab === "gallery") refreshGallery();
}));

// ---------------------------------------------------------------- verify
function setPhoto(field, file) {
  picked[field] = file;
  const drop = document.querySelector(`.drop[data-for="${field}"]`);
  const img = drop.querySelector("img.preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = file ? URL.createObjectURL(file) : "";
  $("verify-go").disabled = !(picked.image_a && picked.image_b);
}

document.querySelectorAll(".drop").forEach((drop) => {
  const field = drop.dataset.for;
  $(field).addEventListener("change", (e) => setPhoto(field, e.target.files[0] || null));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) setPhoto(field, e.dataTransfer.files[0]);
  });
});

function percent(cosine) { return Math.max(0, Math.min(100, (cosine + 1) * 50)); }

$("verify-go").addEventListener("click", async () => {
  $("verify-error").textContent = "";
  $("verify-result").hidden = true;
  $("verify-go").disabled = true;
  document.body.dataset.state = "verifying";
  const form = new FormData();
  form.append("image_a", picked.image_a);
  form.append("image_b", picked.image_b);
  try {
    const r = await api("POST", "/verify?crops=true", form);
    $("crop_a").src = r.face_a.crop;
    $("crop_b").src = r.face_b.crop;
    $("sim-fill").style.width = percent(r.similarity) + "%";
    $("sim-mark").style.left = percent(r.threshold) + "%";
    $("decision").textContent = r.same ? "Same person" : "Different people";
    $("decision").className = r.same ? "same" : "different";
    $("decision").dataset.same = String(r.same);
    $("similarity").textContent = `similarity ${r.similarity.toFixed(4)}, threshold ${r.threshold.toFixed(4)} ` +
      `(${r.threshold_source}); faces found: ${r.face_a.faces} and ${r.face_b.faces}`;
    $("verify-result").hidden = false;
  } catch (e) {
    $("verify-error").textContent = e.message;
  } finally {
    $("verify-go").disabled = false;
    document.body.dataset.state = "done";
  }
});

// ---------------------------------------------------------------- gallery
$("enroll-folder").addEventListener("change", (e) => {
  const first = e.target.files[0];
  if (first && first.webkitRelativePath && !$("enroll-name").value) {
    $("enroll-name").value = first.webkitRelativePath.split("/")[0];
  }
});

$("enroll-go").addEventListener("click", async () => {
  $("gallery-error").textContent = "";
  const files = [...$("enroll-folder").files, ...$("enroll-files").files].filter((f) => f.type.startsWith("image/"));
  const name = $("enroll-name").value.trim();
  if (!name || !files.length) { $("gallery-error").textContent = "give a name and at least one photo"; return; }
  const form = new FormData();
  form.append("name", name);
  form.append("skip_no_face", $("enroll-skip").checked ? "true" : "false");
  files.forEach((f) => form.append("images", f, f.name));
  try {
    const r = await api("POST", "/gallery/enroll", form);
    $("enroll-result").textContent = `${r.identity}: ${r.added} photo(s) added, ${r.already_enrolled} already there` +
      (r.skipped.length ? `, ${r.skipped.length} without a face skipped` : "");
    refreshGallery();
  } catch (e) { $("gallery-error").textContent = e.message; }
});

$("search-go").addEventListener("click", async () => {
  $("gallery-error").textContent = "";
  const file = $("search-file").files[0];
  if (!file) { $("gallery-error").textContent = "pick a photo to search with"; return; }
  const form = new FormData();
  form.append("image", file);
  form.append("top_k", "5");
  const out = $("search-result");
  out.replaceChildren();
  try {
    const r = await api("POST", "/gallery/search?crops=true", form);
    const head = el("div", { className: "match" });
    head.append(el("img", { src: r.face.crop, alt: "query face" }),
      el("strong", { id: "search-decision" }, r.known ? `Known: ${r.identity}` : "Unknown (below the threshold)"));
    out.append(head);
    r.matches.forEach((m) => {
      const row = el("div", { className: "match" + (m.known ? " known" : "") });
      const img = el("img", { alt: m.identity });
      if (m.crop) img.src = m.crop;
      row.append(img, el("span", {}, `${m.identity}: ${m.similarity.toFixed(4)} (${m.images} photo(s))`));
      out.append(row);
    });
  } catch (e) { $("gallery-error").textContent = e.message; }
});

async function refreshGallery() {
  try {
    const r = await api("GET", "/gallery");
    $("gallery-list").textContent = r.count ?
      r.identities.map((x) => `${x.identity} (${x.images})`).join(", ") : "nobody yet";
  } catch (e) { $("gallery-list").textContent = e.message; }
}

api("GET", "/health").then((h) => {
  $("model").textContent = `${h.model.split("/").pop()} · ${h.fingerprint} · threshold ${h.threshold.toFixed(3)}` +
    (h.gallery ? ` · gallery ${h.gallery_size}` : "");
}).catch((e) => { $("model").textContent = e.message; });
