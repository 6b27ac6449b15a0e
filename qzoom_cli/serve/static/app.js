// The qzoom page: upload a document, pick its pages, ask, show each answer on its page with the region read.
"use strict";

const form = document.getElementById("ask");
const fileInput = document.getElementById("file");
const drop = document.getElementById("drop");
const pagesInput = document.getElementById("pages");
const passwordInput = document.getElementById("password");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
let pageCount = 0;

fetch("/health").then((r) => r.json()).then((health) => {
  document.getElementById("model").textContent = `Model: ${health.model} (${health.device})`;
}).catch(() => {});

drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) {
    fileInput.files = event.dataTransfer.files;
    chosen();
  }
});
fileInput.addEventListener("change", chosen);
passwordInput.addEventListener("change", () => { if (fileInput.files.length) showPages(); });
pagesInput.addEventListener("input", () => markPages(pageSet(pagesInput.value)));

function chosen() {
  const file = fileInput.files[0];
  document.getElementById("drop-text").textContent = file ? `${file.name} (${Math.ceil(file.size / 1024)} KB)` : "";
  pagesInput.value = "";
  if (file) showPages();
}

function say(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function post(url, body) {
  const headers = {};
  const key = sessionStorage.getItem("qzoom-key");
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(url, { method: "POST", body, headers });
  if (response.status === 401) {
    const entered = window.prompt("This service needs an API key:");
    if (entered) {
      sessionStorage.setItem("qzoom-key", entered);
      return post(url, body);
    }
  }
  return response;
}

function withDocument() {
  const body = new FormData();
  body.append("file", fileInput.files[0]);
  if (passwordInput.value) body.append("password", passwordInput.value);
  return body;
}

// The chosen document's pages as pictures: clicking one adds it to (or takes it from) the Pages field.
async function showPages() {
  const picker = document.getElementById("picker");
  const pictures = document.getElementById("thumbnails");
  picker.hidden = true;
  pictures.replaceChildren();
  say("Reading the document…");
  const response = await post("/v1/pages", withDocument());
  const reply = await response.json();
  if (!response.ok) {
    say(`Error (${reply.error.code}): ${reply.error.message}`, true);
    return;
  }
  say("");
  pageCount = reply.pages;
  reply.thumbnails.forEach((picture, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumbnail";
    button.dataset.page = i + 1;
    const image = document.createElement("img");
    image.src = picture;
    image.alt = `page ${i + 1}`;
    const caption = document.createElement("span");
    caption.textContent = i + 1;
    button.append(image, caption);
    button.addEventListener("click", () => {
      const pages = pageSet(pagesInput.value);
      pages.has(i + 1) ? pages.delete(i + 1) : pages.add(i + 1);
      pagesInput.value = pageSpec(pages);
      markPages(pages);
    });
    pictures.append(button);
  });
  const more = reply.pages > reply.thumbnails.length ? ` (pictures of the first ${reply.thumbnails.length}; ` +
    "type later pages into Pages)" : "";
  document.getElementById("picker-text").textContent = reply.pages === 1 ? "One page." :
    `${reply.pages} pages${more}: click pages to read only those; with none chosen, the service's default ` +
    "(every page, unless it was started with --pages).";
  picker.hidden = reply.pages === 1;
}

// "1-3,7" as {1, 2, 3, 7} (up to the document's last page); the service checks the spec itself,
// this only marks the pictures.
function pageSet(spec) {
  const pages = new Set();
  spec.split(",").forEach((part) => {
    const [first, last = first] = part.split("-").map((n) => parseInt(n, 10));
    for (let page = first; page <= Math.min(last, pageCount); page++) pages.add(page);
  });
  return pages;
}

function pageSpec(pages) {
  const sorted = [...pages].sort((a, b) => a - b);
  const runs = [];
  sorted.forEach((page) => {
    const run = runs[runs.length - 1];
    if (run && page === run[1] + 1) run[1] = page; else runs.push([page, page]);
  });
  return runs.map(([first, last]) => (first === last ? `${first}` : `${first}-${last}`)).join(",");
}

function markPages(pages) {
  document.querySelectorAll(".thumbnail").forEach((button) => {
    button.classList.toggle("chosen", pages.has(Number(button.dataset.page)));
  });
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const questions = document.getElementById("questions").value.split("\n").map((q) => q.trim()).filter(Boolean);
  if (!fileInput.files.length || !questions.length) {
    say("Choose a document and write a question.", true);
    return;
  }
  const body = withDocument();
  questions.forEach((question) => body.append("question", question));
  body.append("overlay", "true");
  const pages = pagesInput.value.trim();
  if (pages) body.append("pages", pages);
  const zoom = document.getElementById("zoom").value;
  if (zoom) body.append("zoom", zoom);
  document.getElementById("submit").disabled = true;
  say("Answering…");
  results.replaceChildren();
  try {
    const response = await post("/v1/ask", body);
    const reply = await response.json();
    if (!response.ok) {
      say(`Error (${reply.error.code}): ${reply.error.message}`, true);
      return;
    }
    say("");
    reply.results.forEach((record, i) => results.append(card(record, reply.overlays[i])));
  } catch (error) {
    say(`The service did not answer: ${error}`, true);
  } finally {
    document.getElementById("submit").disabled = false;
  }
});

function card(record, overlay) {
  const node = document.getElementById("result").content.cloneNode(true);
  node.querySelector(".question").textContent = record.question;
  node.querySelector(".answer").textContent = record.answer ?? "";
  const zoom = record.zoom;
  node.querySelector(".zoom").textContent = zoom.zoomed
    ? `Zoomed: read the region ${zoom.roi.bbox_xyxy.join(", ")} (page pixels) at high resolution.`
    : `Zoom skipped: ${zoom.skipped_reason ?? "zoom was off"}.`;
  const stats = record.stats;
  const rows = [
    ["Page", record.page],
    ["Visual tokens", `${stats.visual_tokens} (page ${stats.coarse_visual_tokens} + region ${stats.region_visual_tokens})`],
    ["Full-resolution equivalent", `${stats.baseline_visual_tokens} tokens`],
    ["Answer tokens", stats.output_tokens],
    ["Time", `${stats.latency_s.toFixed(2)} s`],
  ];
  if (zoom.gate) rows.push(["Gate", `${zoom.gate.kind} ${zoom.gate.score.toFixed(3)} (threshold ${zoom.gate.threshold})`]);
  if (record.candidates.length > 1) {
    rows.push(["Pages tried", record.candidates.map((c) => `${c.page}: “${c.answer}” (${c.score.toFixed(2)})`).join("; ")]);
  }
  const list = node.querySelector(".stats");
  rows.forEach(([name, value]) => {
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = value;
    list.append(term, detail);
  });
  const warnings = node.querySelector(".warnings");
  record.warnings.forEach((warning) => {
    const item = document.createElement("li");
    item.textContent = warning;
    warnings.append(item);
  });
  const figure = node.querySelector("figure");
  if (overlay) {
    figure.querySelector(".overlay").src = overlay;
    figure.querySelector("figcaption").textContent = zoom.zoomed
      ? "Red: where the question points on the page; blue: the region read again."
      : "The answering page; red, where shown: where the question points on it (no region was read again).";
  } else {
    figure.remove();
  }
  return node;
}
