"use strict";
// The speech tab: PlayDiffusion edits at POST /v1/speech/edit (multipart: audio, input_text,
// output_text, word_times JSON [{word, start, end}], optional num_steps, topk, guidance, seed)
// -> audio/wav, with X-Units and X-Timings (seconds per phase) headers. The server mounts the
// route only when started with --speech (/v1/model lists it among its endpoints then).

async function setUpSpeech(m) {
  if (!m.endpoints.includes("/v1/speech/edit")) {
    $("tab-speech").disabled = true;
    $("tab-speech").title = "this server has no speech model";
    $("speech-off").textContent = "Speech edit is off: this server has no speech model (start it with "
      + "`magnet-engine serve --speech random` for random weights, or --speech DIR|ID).";
    $("speech-off").hidden = false;
    return;
  }
  const response = await fetch("/v1/speech/edit/defaults");
  if (!response.ok) throw new Error(await errorText(response));
  const defaults = await response.json();
  $("speech-steps").value = defaults.num_steps;
  $("speech-topk").value = defaults.topk;
  $("speech-guidance").value = defaults.guidance;
  $("tab-speech").dataset.ready = "true";   // read by tests/test_browser.py
}

async function editSpeech(event) {
  event.preventDefault();
  $("speech-run").disabled = true;
  showError($("speech-error"), "");
  $("speech-status").textContent = "editing…";
  const form = new FormData();
  const file = $("speech-audio").files[0];
  form.append("audio", file, file.name);
  form.append("input_text", $("speech-from").value);
  form.append("output_text", $("speech-to").value);
  form.append("word_times", $("speech-times").value);
  for (const [field, id] of [["num_steps", "speech-steps"], ["topk", "speech-topk"],
                             ["guidance", "speech-guidance"], ["seed", "speech-seed"]]) {
    if ($(id).value !== "") form.append(field, $(id).value);
  }
  const started = performance.now();
  try {
    const response = await fetch("/v1/speech/edit", {method: "POST", body: form});
    if (!response.ok) throw new Error(await errorText(response));
    const wav = await response.arrayBuffer();
    showSpeech(wav, response.headers, performance.now() - started);
    $("speech-status").textContent = "done";
  } catch (err) {
    $("speech-status").textContent = "";
    showError($("speech-error"), err.message);
  } finally {
    $("speech-run").disabled = false;
  }
}

function showSpeech(wav, headers, totalMs) {
  const player = $("speech-player");
  if (player.src.startsWith("blob:")) URL.revokeObjectURL(player.src);
  player.src = URL.createObjectURL(new Blob([wav], {type: "audio/wav"}));
  $("speech-download").href = player.src;
  $("speech-result").hidden = false;
  drawWaveform($("speech-waveform"), pcmSamples(wav));
  const timings = JSON.parse(headers.get("X-Timings") || "{}");
  for (const phase of ["tokenize", "plan", "unmask", "vocode"]) {
    $(`p-${phase}`).textContent = phase in timings ? `${Math.round(1000 * timings[phase])} ms` : "";
  }
  $("p-units").textContent = headers.get("X-Units");
  $("p-total").textContent = `${Math.round(totalMs)} ms`;
  player.play().catch(() => {});   // a browser may refuse to autoplay; the controls remain
}

$("speech-form").addEventListener("submit", editSpeech);
modelReady.then(setUpSpeech).catch((err) => showError($("speech-error"), `speech defaults: ${err.message}`));
