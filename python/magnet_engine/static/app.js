"use strict";
// The demo page: POST /v1/generate, follow /v1/progress/{id} (server-sent events) meanwhile,
// drawing the token canvas as each decoding step fills it in, then play the wav and draw its
// waveform from the 16-bit PCM samples of the response. Also the tabs and the helpers the
// other scripts share (edit.js, stream.js, speech.js, loaded after this one); a generated clip
// is announced to them as a "clip" event on window.

const $ = (id) => document.getElementById(id);
let modelInfo = null;

async function loadModel() {
  const response = await fetch("/v1/model");
  modelInfo = await response.json();
  const m = modelInfo;
  $("model-line").textContent =
    `${m.name} · ${m.engine} engine on ${m.device} · ${m.sample_rate} Hz · up to ${m.max_duration} s`;
  if (m.note) {
    $("note").textContent = m.note;
    $("note").hidden = false;
  }
  $("duration").max = m.max_duration;
  $("duration").value = Math.min(2, m.max_duration);
  $("steps").value = m.defaults.decoding_steps.join(",");
  $("temperature").value = m.defaults.temperature;
  $("top_p").value = m.defaults.top_p;
  $("prompt").maxLength = m.limits.max_text_chars;
  return m;
}

function newRequestId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Array.from({length: 4}, () => Math.random().toString(16).slice(2, 10)).join("");
}

function requestBody(requestId) {
  return {
    request_id: requestId,
    description: $("prompt").value.trim(),
    duration: Number($("duration").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    ...formOptions(),
  };
}

function setStatus(text, fraction) {
  $("status").textContent = text;
  if (fraction !== undefined) $("progress").value = fraction;
}

function followProgress(requestId, request) {
  const events = new EventSource(`/v1/progress/${encodeURIComponent(requestId)}`);
  const on = (kind, handler) => events.addEventListener(kind, (e) => {
    $("status").dataset.lastEvent = kind;  // read by tests/test_browser.py
    handler(JSON.parse(e.data));
  });
  on("queued", (d) => setStatus(`queued (position ${d.position})`, 0));
  on("started", (d) => setStatus(`generating in a batch of ${d.batch_size}`));
  on("step", (d) => {
    setStatus(d.stage === "prefix"
              ? `autoregressive prefix, step ${d.step}/${d.stage_steps}`
              : `codebook ${d.stage + 1}/${modelInfo.n_q}, step ${d.step}/${d.stage_steps}`,
              0.95 * d.done / d.total);
    if (d.canvas) drawTokens($("tokens"), d.canvas, d.done);
  });
  on("prefix", (d) => {   // hybrid checkpoints: the AR prefix plays while the tail is decoded
    $("status").dataset.prefixSeconds = d.seconds;
    if (!d.rows.includes(0) || request.done) return;   // a late event never replaces the full clip
    $("audio").src = `${d.url}?index=0`;
    $("result").hidden = false;
  });
  on("codec", () => setStatus("decoding audio", 0.95));
  on("done", () => events.close());
  on("error", () => events.close());
  events.onerror = () => events.close();  // the POST's answer is what counts; no reconnects
  return events;
}

async function generate(event) {
  event.preventDefault();
  $("generate").disabled = true;
  $("error").hidden = true;
  const requestId = newRequestId();
  const request = {done: false};
  const events = followProgress(requestId, request);
  const started = performance.now();
  try {
    const response = await fetch("/v1/generate", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(requestBody(requestId)),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const wav = await response.arrayBuffer();
    request.done = true;
    showResult(wav, response.headers, performance.now() - started);
  } catch (err) {
    setStatus("failed", 0);
    $("error").textContent = err.message;
    $("error").hidden = false;
  } finally {
    // The answer can overtake the progress stream's last events (two connections): let them
    // arrive; "done"/"error" close the stream themselves, this only bounds a silent one.
    setTimeout(() => events.close(), 5000);
    $("generate").disabled = false;
  }
}

function showResult(wav, headers, totalMs) {
  const audio = $("audio");
  if (audio.src.startsWith("blob:")) URL.revokeObjectURL(audio.src);
  audio.src = URL.createObjectURL(new Blob([wav], {type: "audio/wav"}));
  $("result").hidden = false;
  drawWaveform($("waveform"), pcmSamples(wav));
  const ms = (name) => `${Math.round(Number(headers.get(name)))} ms`;
  $("t-queue").textContent = ms("X-Queue-Wait-Ms");
  $("t-tokens").textContent = ms("X-Tokens-Ms");
  $("t-codec").textContent = ms("X-Codec-Ms");
  $("t-total").textContent = `${Math.round(totalMs)} ms`;
  $("t-batch").textContent = headers.get("X-Batch-Size");
  $("t-seed").textContent = headers.get("X-Seed");
  setStatus("done", 1);
  window.dispatchEvent(new CustomEvent("clip", {detail: {wav, description: $("prompt").value.trim()}}));
}

// The service answers every error as {"error": {"status", "type", "message"}}.
async function errorText(response) {
  const answer = await response.json().catch(() => null);
  const error = answer && answer.error;
  return error ? `${error.status} ${error.type}: ${error.message}` : `HTTP ${response.status}`;
}

function showError(element, message) {
  element.textContent = message;
  element.hidden = !message;
}

// A section whose route this server does not mount: its controls off, and a note saying why.
function switchOff(sectionId, note) {
  const section = $(sectionId);
  for (const control of section.querySelectorAll("button, input, textarea")) control.disabled = true;
  const line = document.createElement("p");
  line.className = "note";
  line.textContent = note;
  section.querySelector("h2").after(line);
  section.dataset.off = "true";   // read by tests/test_browser.py
}

// The decoding options of the form above, shared by the edit and stream requests.
function formOptions() {
  const options = {decoding_steps: $("steps").value.split(",").map((s) => Number(s.trim()))};
  if ($("seed").value !== "") options.seed = Number($("seed").value);
  return options;
}

// The token canvas after a step (server: batcher.canvas_snapshot): codebooks x frames bytes,
// 0 = masked (dark), 1..255 = fixed, brightness rising with the decoder's confidence.
function drawTokens(canvas, snapshot, done) {
  const {codebooks, frames} = snapshot;
  const cells = Uint8Array.from(atob(snapshot.cells), (c) => c.charCodeAt(0));
  if (cells.length !== codebooks * frames) return;
  canvas.hidden = false;
  $("tokens-legend").hidden = false;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(frames, codebooks);
  for (let i = 0; i < cells.length; i++) {
    const v = cells[i];
    const a = v === 0 ? 0 : 0.3 + 0.7 * (v - 1) / 254;    // a fixed cell is never as dark as a masked one
    image.data.set(v === 0 ? [16, 20, 28, 255] : [89 * a, 195 * a, 255 * a, 255], 4 * i);
  }
  // One pixel per cell, then scaled to the element: rows are codebooks, columns frames.
  const scratch = document.createElement("canvas");
  scratch.width = frames;
  scratch.height = codebooks;
  scratch.getContext("2d").putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(scratch, 0, 0, canvas.width, canvas.height);
  canvas.dataset.done = done;                                   // read by tests/test_browser.py
  canvas.dataset.fixed = cells.reduce((n, v) => n + (v > 0), 0);
}

// First channel of a 16-bit PCM WAV as floats in [-1, 1].
function pcmSamples(buffer) {
  const view = new DataView(buffer);
  const tag = (at) => String.fromCharCode(...new Uint8Array(buffer, at, 4));
  if (buffer.byteLength < 12 || tag(0) !== "RIFF" || tag(8) !== "WAVE") return new Float32Array(0);
  let channels = 1;
  for (let at = 12; at + 8 <= buffer.byteLength;) {
    const size = view.getUint32(at + 4, true);
    if (tag(at) === "fmt ") channels = view.getUint16(at + 10, true);
    if (tag(at) === "data") {
      const start = at + 8;
      const frames = Math.floor(Math.min(size, buffer.byteLength - start) / (2 * channels));
      const out = new Float32Array(frames);
      for (let i = 0; i < frames; i++) out[i] = view.getInt16(start + 2 * channels * i, true) / 32768;
      return out;
    }
    at += 8 + size + (size % 2);
  }
  return new Float32Array(0);
}

// One vertical line per pixel column, from the min to the max sample in that column, over
// shaded bands: shades [{start, end, color}] in fractions of the width.
function drawWaveform(canvas, samples, shades = []) {
  const ctx = canvas.getContext("2d");
  const {width, height} = canvas;
  const mid = height / 2;
  ctx.fillStyle = "#10141c";
  ctx.fillRect(0, 0, width, height);
  for (const {start, end, color} of shades) {
    ctx.fillStyle = color;
    ctx.fillRect(start * width, 0, Math.max(1, (end - start) * width), height);
  }
  ctx.strokeStyle = "#2a3242";
  ctx.beginPath();
  ctx.moveTo(0, mid);
  ctx.lineTo(width, mid);
  ctx.stroke();
  if (!samples.length) return;
  ctx.strokeStyle = "#59c3ff";
  ctx.beginPath();
  const perColumn = samples.length / width;
  for (let x = 0; x < width; x++) {
    let lo = 1, hi = -1;
    const end = Math.min(samples.length, Math.ceil((x + 1) * perColumn));
    for (let i = Math.floor(x * perColumn); i < end; i++) {
      lo = Math.min(lo, samples[i]);
      hi = Math.max(hi, samples[i]);
    }
    if (lo > hi) continue;
    ctx.moveTo(x + 0.5, mid - hi * mid);
    ctx.lineTo(x + 0.5, mid - lo * mid + 1);
  }
  ctx.stroke();
}

function showTab(button) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.setAttribute("aria-selected", String(tab === button));
    $(tab.dataset.panel).hidden = tab !== button;
  }
}

for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab));
$("form").addEventListener("submit", generate);
const modelReady = loadModel();
modelReady.catch((err) => setStatus(`cannot read /v1/model: ${err.message}`));
