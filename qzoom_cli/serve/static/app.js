// The qzoom page: upload a document, ask, show each answer on its page with the region read.
"use strict";

const form = document.getElementById("ask");
const fileInput = document.getElementById("file");
const drop = document.getElementById("drop");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");

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
    showChosen();
  }
});
fileInput.addEventListener("change", showChosen);

function showChosen() {
  const file = fileInput.files[0];
  document.getElementById("drop-text").textContent = file ? `${file.name} (${Math.ceil(file.size / 1024)} KB)` : "";
}

function say(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function post(body) {
  const headers = {};
  const key = sessionStorage.getItem("qzoom-key");
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch("/v1/ask", { method: "POST", body, headers });
  if (response.status === 401) {
    const entered = window.prompt("This service needs an API key:");
    if (entered) {
      sessionStorage.setItem("qzoom-key", entered);
      return post(body);
    }
  }
  return response;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const questions = document.getElementById("questions").value.split("\n").map((q) => q.trim()).filter(Boolean);
  if (!fileInput.files.length || !questions.length) {
    say("Choose a document and write a question.", true);
    return;
  }
  const body = new FormData();
  body.append("file", fileInput.files[0]);
  questions.forEach((question) => body.append("question", question));
  body.append("overlay", "true");
  const pages = document.getElementById("pages").value.trim();
  if (pages) body.append("pages", pages);
  const zoom = document.getElementById("zoom").value;
  if (zoom) body.append("zoom", zoom);
  document.getElementById("submit").disabled = true;
  say("Answering…");
  results.replaceChildren();
  try {
    const response = await post(body);
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
  const list = node.querySelector(".stats");
  rows.forEach(([name, value]) => {
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = value;
    list.append(term, detail);
  });
  const image = node.querySelector(".overlay");
  image.src = overlay;
  node.querySelector("figcaption").textContent = zoom.zoomed
    ? "Red: where the question points on the page; blue: the region read again."
    : "The answering page.";
  return node;
}
