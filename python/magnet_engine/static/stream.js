"use strict";
// Long-form playback as it is decoded: POST /v1/stream {description, duration, seed,
// decoding_steps} -> {id, events}; the events stream says `chunk` {index, url, seconds} per
// decoded window, then `done` {chunks, seconds} or `error` {type, message}. Each chunk's wav is
// decoded with the Web Audio API and scheduled to start exactly where the previous one ends, so
// the windows play back to back with no gap as long as decoding keeps ahead of playback.

// Read by tests/test_browser.py: one entry per chunk as it is scheduled, and the totals.
window.streamState = null;

let streamContext = null;

function streamStatus(text, fraction) {
  $("stream-status").textContent = text;
  if (fraction !== undefined) $("stream-progress").value = fraction;
}

async function startStream() {
  const clicked = performance.now();
  const duration = Number($("stream-duration").value);
  showError($("stream-error"), "");
  for (const id of ["s-first", "s-total", "s-chunks", "s-seconds", "s-gaps"]) $(id).textContent = "";
  // Made on the click (a user gesture, so it may play), at the model's rate so nothing is resampled.
  if (streamContext) streamContext.close();
  const context = streamContext = new AudioContext({sampleRate: modelInfo.sample_rate, latencyHint: "playback"});
  const state = window.streamState = {duration, chunks: [], ended: [], firstAudioMs: null, totalMs: null,
                                      gaps: 0, nextStart: 0, samples: [], done: null, finished: false};
  $("stream-run").disabled = true;
  streamStatus("starting", 0);
  try {
    const body = {description: $("prompt").value.trim() || null, duration, ...formOptions()};
    const response = await fetch("/v1/stream", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (!response.ok) throw new Error(await errorText(response));
    const {events} = await response.json();
    await followStream(events, context, state, clicked);
    state.totalMs = performance.now() - clicked;
    $("s-total").textContent = `${Math.round(state.totalMs)} ms`;
    streamStatus(`done: ${state.chunks.length} chunks, ${secondsOf(state).toFixed(2)} s`, 1);
  } catch (err) {
    streamStatus("failed");
    showError($("stream-error"), err.message);
  } finally {
    state.finished = true;
    $("stream-run").disabled = false;
  }
}

function secondsOf(state) {
  return state.chunks.reduce((sum, c) => sum + c.seconds, 0);
}

// Resolves when the stream is done and every chunk is scheduled; rejects on an `error` event.
function followStream(url, context, state, clicked) {
  return new Promise((resolve, reject) => {
    const events = new EventSource(url);
    let queue = Promise.resolve();      // chunks are fetched concurrently but scheduled in order
    const fail = (message) => { events.close(); reject(new Error(message)); };
    events.addEventListener("chunk", (e) => {
      const chunk = JSON.parse(e.data);
      const wav = fetch(chunk.url).then((r) => r.ok ? r.arrayBuffer() : errorText(r).then((t) => { throw new Error(t); }));
      wav.catch(() => {});              // reported through the queue, once an earlier chunk has not failed
      queue = queue.then(async () => schedule(context, state, chunk, await context.decodeAudioData(await wav), clicked));
      queue.catch((err) => fail(`chunk ${chunk.index}: ${err.message}`));
    });
    events.addEventListener("done", (e) => {
      events.close();
      state.done = JSON.parse(e.data);
      queue.then(resolve, () => {});    // a failed chunk has already rejected
    });
    events.addEventListener("error", (e) => {
      // A named `error` event carries the server's reason; a bare one is the connection failing.
      // No reconnecting: the server would replay the run's events from the first chunk.
      if (e.data) {
        const error = JSON.parse(e.data);
        fail(`${error.type}: ${error.message}`);
      } else {
        fail("the event stream was lost");
      }
    });
  });
}

function schedule(context, state, chunk, buffer, clicked) {
  const lead = 0.05;   // seconds: room for the audio thread to pick the buffer up
  const now = context.currentTime;
  let when = state.nextStart;
  if (!state.chunks.length || when < now + 0.005) {   // first chunk, or decoding fell behind playback
    if (state.chunks.length) state.gaps += 1;
    when = now + lead;
  }
  const source = context.createBufferSource();
  source.buffer = buffer;
  source.connect(context.destination);
  source.onended = () => state.ended.push(chunk.index);
  source.start(when);
  state.nextStart = when + buffer.duration;
  state.chunks.push({index: chunk.index, seconds: buffer.duration, when});
  state.samples.push(buffer.getChannelData(0));
  if (state.firstAudioMs === null) {
    // When the first sample reaches the speakers: now, plus the lead it was scheduled with.
    state.firstAudioMs = performance.now() - clicked + (when - now) * 1000;
    $("s-first").textContent = `${Math.round(state.firstAudioMs)} ms`;
  }
  const seconds = secondsOf(state);
  $("s-chunks").textContent = String(state.chunks.length);
  $("s-seconds").textContent = `${seconds.toFixed(2)} s`;
  $("s-gaps").textContent = String(state.gaps);
  streamStatus(`chunk ${chunk.index + 1}: ${seconds.toFixed(2)} of ${state.duration} s decoded`,
               Math.min(1, seconds / state.duration));
  drawStream(state);
}

// The clip so far, on the scale of the whole requested duration, chunk boundaries marked.
function drawStream(state) {
  const total = Math.max(state.duration, secondsOf(state));
  const length = state.samples.reduce((n, s) => n + s.length, 0);
  const joined = new Float32Array(length);
  let at = 0;
  for (const s of state.samples) { joined.set(s, at); at += s.length; }
  const canvas = $("stream-waveform");
  const width = Math.max(1, Math.round(canvas.width * secondsOf(state) / total));
  const shades = [];   // [{start, end, color}] in fractions of the width, one per chunk
  let start = 0;
  for (const [i, c] of state.chunks.entries()) {
    shades.push({start: start / total, end: (start + c.seconds) / total,
                 color: i % 2 ? "rgba(89, 195, 255, 0.10)" : "rgba(240, 198, 116, 0.10)"});
    start += c.seconds;
  }
  // drawWaveform spreads the samples over a canvas's width: draw them on one as wide as their
  // share of the duration, then the chunk bands over both.
  const scratch = document.createElement("canvas");
  scratch.width = width;
  scratch.height = canvas.height;
  drawWaveform(scratch, joined);
  drawWaveform(canvas, new Float32Array(0));
  const ctx = canvas.getContext("2d");
  ctx.drawImage(scratch, 0, 0);
  for (const {start, end, color} of shades) {
    ctx.fillStyle = color;
    ctx.fillRect(start * canvas.width, 0, (end - start) * canvas.width, canvas.height);
  }
}

modelReady.then((m) => {
  const limit = m.limits.max_stream_duration;
  $("stream-duration").value = limit ? Math.min(3 * m.max_duration, limit) : 3 * m.max_duration;
  if (limit) $("stream-duration").max = limit;   // the server's 422 stays the authority
  if (!m.endpoints.includes("/v1/stream")) {
    switchOff("stream-box", "This server does not offer long-form streaming (POST /v1/stream); "
              + "`magnet-engine serve` does.");
  }
});
$("stream-run").addEventListener("click", startStream);
drawWaveform($("stream-waveform"), new Float32Array(0));
