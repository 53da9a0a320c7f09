"use strict";
// Region editing: the last generated clip (or an uploaded file) drawn on a canvas; drag to select
// a region, shift-drag to add one; "Regenerate region" POSTs the clip and the regions to /v1/edit
// (multipart: audio, regions JSON [[start, end], ...] in seconds, description, seed,
// decoding_steps JSON) and plays the edited clip, which becomes the clip to edit next.

const SELECTED = "rgba(89, 195, 255, 0.28)";
const REGENERATED = "rgba(240, 198, 116, 0.35)";

const edit = {
  wav: null,          // ArrayBuffer: the clip as uploaded to /v1/edit
  name: "clip.wav",
  samples: new Float32Array(0),
  seconds: 0,
  selection: [],      // [[start, end], ...] seconds, as sent
  regenerated: [],    // the regions the current clip had decoded again
  drag: null,         // {from, to, add} while the mouse is down
  off: false,         // the server has no /v1/edit
};

// Any format the browser decodes; the sample rate only matters for drawing, so a rate every
// browser supports will do. An OfflineAudioContext needs no user gesture.
async function decodeClip(wav) {
  const decoded = await new OfflineAudioContext(1, 1, 44100).decodeAudioData(wav.slice(0));
  return {samples: decoded.getChannelData(0), seconds: decoded.duration};
}

async function setEditClip(wav, name, regenerated, description) {
  if (edit.off) return;
  const {samples, seconds} = await decodeClip(wav);
  Object.assign(edit, {wav, name, samples, seconds, selection: [], regenerated});
  if (description !== undefined) $("edit-description").value = description;
  $("edit-source").textContent = `${name}: ${seconds.toFixed(2)} s`;
  showError($("edit-error"), "");
  drawEdit();
}

function drawEdit() {
  const band = ([start, end], color) => ({start: start / edit.seconds, end: end / edit.seconds, color});
  const regions = edit.drag ? [...(edit.drag.add ? edit.selection : []), ordered(edit.drag)] : edit.selection;
  const shades = edit.seconds ? [...edit.regenerated.map((r) => band(r, REGENERATED)),
                                 ...regions.map((r) => band(r, SELECTED))] : [];
  drawWaveform($("edit-waveform"), edit.samples, shades);
  const text = regions.map(([a, b]) => `${a.toFixed(2)}–${b.toFixed(2)} s`).join(", ");
  $("edit-regions").textContent = text || "none";
  $("edit-regions").dataset.regions = JSON.stringify(edit.selection);   // read by tests/test_browser.py
  $("edit-run").disabled = edit.off || !edit.wav || !edit.selection.length;
}

function ordered({from, to}) {
  return [Math.min(from, to), Math.max(from, to)];
}

// Milliseconds are finer than any codec frame (20 ms at 50 Hz); the server snaps outward.
function secondsAt(event) {
  const box = $("edit-waveform").getBoundingClientRect();
  const fraction = Math.min(1, Math.max(0, (event.clientX - box.left) / box.width));
  return Math.round(fraction * edit.seconds * 1000) / 1000;
}

function startDrag(event) {
  if (!edit.seconds || event.button !== 0) return;
  event.preventDefault();
  const at = secondsAt(event);
  edit.drag = {from: at, to: at, add: event.shiftKey};
  drawEdit();
}

function moveDrag(event) {
  if (!edit.drag) return;
  edit.drag.to = secondsAt(event);
  drawEdit();
}

// A click without a drag clears the selection (a shift-click keeps it).
function endDrag(event) {
  if (!edit.drag) return;
  edit.drag.to = secondsAt(event);
  const region = ordered(edit.drag);
  const kept = edit.drag.add ? edit.selection : [];
  edit.selection = region[1] > region[0] ? [...kept, region].sort((a, b) => a[0] - b[0]) : kept;
  edit.drag = null;
  drawEdit();
}

async function regenerate() {
  $("edit-run").disabled = true;
  showError($("edit-error"), "");
  const regions = edit.selection;
  const form = new FormData();
  form.append("audio", new Blob([edit.wav], {type: "audio/wav"}), edit.name);
  form.append("regions", JSON.stringify(regions));
  const description = $("edit-description").value.trim() || $("prompt").value.trim();
  if (description) form.append("description", description);
  const {decoding_steps, seed} = formOptions();
  form.append("decoding_steps", JSON.stringify(decoding_steps));
  if (seed !== undefined) form.append("seed", String(seed));
  $("edit-status").textContent = "regenerating…";
  const started = performance.now();
  try {
    const response = await fetch("/v1/edit", {method: "POST", body: form});
    if (!response.ok) throw new Error(await errorText(response));
    const wav = await response.arrayBuffer();
    const ms = Math.round(performance.now() - started);
    const audio = $("edit-audio");
    if (audio.src.startsWith("blob:")) URL.revokeObjectURL(audio.src);
    audio.src = URL.createObjectURL(new Blob([wav], {type: "audio/wav"}));
    audio.hidden = false;
    $("edit-download").href = audio.src;
    $("edit-download").hidden = false;
    await setEditClip(wav, "edited.wav", regions);
    $("edit-status").textContent = `regenerated in ${ms} ms`;
    audio.play().catch(() => {});   // a browser may refuse to autoplay; the controls remain
  } catch (err) {
    $("edit-status").textContent = "";
    showError($("edit-error"), err.message);
  } finally {
    drawEdit();
  }
}

async function chooseFile() {
  const file = $("edit-file").files[0];
  if (!file) return;
  try {
    await setEditClip(await file.arrayBuffer(), file.name, []);
  } catch (err) {
    showError($("edit-error"), `cannot decode ${file.name}: ${err.message || err}`);
  }
}

modelReady.then((m) => {
  if (m.endpoints.includes("/v1/edit")) return;
  edit.off = true;
  switchOff("edit-box", "This server does not offer region editing (POST /v1/edit); `magnet-engine serve` does.");
});
window.addEventListener("clip", (e) => {
  $("edit-file").value = "";
  setEditClip(e.detail.wav, "generated.wav", [], e.detail.description);
});
$("edit-waveform").addEventListener("mousedown", startDrag);
window.addEventListener("mousemove", moveDrag);
window.addEventListener("mouseup", endDrag);
$("edit-clear").addEventListener("click", () => { edit.selection = []; drawEdit(); });
$("edit-run").addEventListener("click", regenerate);
$("edit-file").addEventListener("change", chooseFile);
drawEdit();
