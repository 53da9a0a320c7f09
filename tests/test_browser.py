"""The demo page in headless Chromium: type a prompt, Generate, get a playable wav; drag a
region on the waveform and regenerate it; stream a long-form clip window by window; edit
speech in the speech tab.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package. Screenshots land
in the test's tmp dir; with MAGNET_SAVE_SCREENSHOT=1 also in benchmarks/results/demo_*.png
(a plain test run never writes into the source tree).
"""
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from magnet_engine.api import MAGNeT
from magnet_engine.demo import build_random_model
from magnet_engine.server import BackgroundServer, Settings, create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="headless browser test needs Debian's chromium and chromium-driver "
                                       "(apt-get install chromium chromium-driver)")


@pytest.fixture
def driver(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,1000", "--autoplay-policy=no-user-gesture-required",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


@pytest.fixture
def server_url(tmp_path):
    model = MAGNeT.from_pretrained(build_random_model(tmp_path / "tiny", "tiny"), device="cpu", engine="fast",
                                   name="demo-tiny (random weights)")
    app = create_app(model, Settings(note="Demo model with random (untrained) weights: it makes noise, not music."))
    with BackgroundServer(app) as url:
        yield url


def test_demo_page_generates_playable_audio(driver, server_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def field(element_id: str, value: str) -> None:
        element = driver.find_element(By.ID, element_id)
        element.clear()
        element.send_keys(value)

    driver.get(server_url)
    line = driver.find_element(By.ID, "model-line")
    WebDriverWait(driver, 30).until(lambda _: "engine" in line.text)
    field("prompt", "warm lo-fi piano with soft vinyl crackle")
    field("duration", "2")
    field("steps", "8,4,4,4")
    field("seed", "42")
    driver.find_element(By.ID, "generate").click()

    playable = "const a = document.getElementById('audio'); return a.readyState >= 1 && a.duration > 0;"
    WebDriverWait(driver, 120).until(lambda d: d.execute_script(playable))
    assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
    assert driver.execute_script("return document.getElementById('audio').duration") == pytest.approx(1.98, abs=0.02)
    status = driver.find_element(By.ID, "status")
    assert status.text == "done" and status.get_attribute("data-last-event") == "done"  # SSE reached the page
    assert driver.execute_script("return document.getElementById('progress').value") == 1
    for cell in ("t-queue", "t-tokens", "t-codec", "t-total"):
        assert driver.find_element(By.ID, cell).text.endswith(" ms")
    assert driver.find_element(By.ID, "t-seed").text == "42"
    waveform_pixels = driver.execute_script("""
        const c = document.getElementById('waveform');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) if (px[i + 2] > 200) n++;   // the trace's blue
        return n;""")
    assert waveform_pixels > 500
    # create_app mounts the edit and stream routers on its worker, but no speech model: the page says so
    assert driver.find_element(By.ID, "tab-speech").get_attribute("disabled") is not None
    assert "--speech random" in driver.find_element(By.ID, "speech-off").text
    for section in ("edit-box", "stream-box"):
        assert driver.find_element(By.ID, section).get_attribute("data-off") is None

    console_errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not console_errors, console_errors

    shot = tmp_path / "demo_page.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("MAGNET_SAVE_SCREENSHOT") == "1":
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, RESULTS / "demo_page.png")


@pytest.fixture
def hybrid_server_url(tmp_path):
    model = MAGNeT.from_pretrained(build_random_model(tmp_path / "hybrid", "tiny", kind="hybrid"), device="cpu",
                                   name="demo-tiny-hybrid (random weights)")
    with BackgroundServer(create_app(model, Settings())) as url:
        yield url


def test_demo_page_plays_the_hybrid_prefix_first(driver, hybrid_server_url):
    """A hybrid checkpoint: the page receives the SSE "prefix" event, points the player at
    /v1/prefix/<id> (the AR prefix, 0.94 s of a 2 s clip), then swaps in the full clip."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(hybrid_server_url)
    WebDriverWait(driver, 30).until(lambda _: "engine" in driver.find_element(By.ID, "model-line").text)
    # remember every source the player is given
    driver.execute_script("""
        const a = document.getElementById('audio'); window.sources = [];
        new MutationObserver(() => window.sources.push(a.src)).observe(a, {attributes: true, attributeFilter: ['src']});""")
    for element_id, value in (("prompt", "slow strings"), ("duration", "2"), ("steps", "4,2,2,2"), ("seed", "7")):
        element = driver.find_element(By.ID, element_id)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, "generate").click()
    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, 120).until(lambda _: status.get_attribute("data-last-event") == "done")
    assert status.get_attribute("data-prefix-seconds") == "0.94"
    sources = driver.execute_script("return window.sources")
    assert "/v1/prefix/" in sources[0] and sources[-1].startswith("blob:")
    playable = "const a = document.getElementById('audio'); return a.readyState >= 1 && a.duration > 0;"
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(playable))
    assert driver.execute_script("return document.getElementById('audio').duration") == pytest.approx(1.98, abs=0.02)
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


class HeldModel:
    """A model whose run stops, after the server has seen step `hold_at`, until `gate` opens."""

    def __init__(self, model, hold_at: int):
        import threading

        self._model, self.hold_at = model, hold_at
        self.held, self.gate = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate_tokens(self, descriptions, on_event=None, **kwargs):
        from magnet_engine.engine.events import StageStep

        def listen(event):
            on_event(event)
            if isinstance(event, StageStep) and event.done == self.hold_at:
                self.held.set()
                assert self.gate.wait(timeout=120), "test gate never opened"
        return self._model.generate_tokens(descriptions, on_event=listen, **kwargs)


@pytest.fixture
def held_server(tmp_path):
    model = HeldModel(MAGNeT.from_pretrained(build_random_model(tmp_path / "tiny", "tiny"), device="cpu",
                                             name="demo-tiny (random weights)"), hold_at=9)
    with BackgroundServer(create_app(model, Settings())) as url:
        yield url, model
    model.gate.set()


def test_demo_page_draws_the_token_canvas_mid_generation(driver, held_server, tmp_path):
    """Steps 8,4,4,4, held after step 9 (codebook 2's first step): the page's token canvas has
    codebook 1 fully fixed, codebook 2 filled and shaded by confidence, codebooks 3-4 masked."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, model = held_server
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda _: "engine" in driver.find_element(By.ID, "model-line").text)
    for element_id, value in (("prompt", "warm piano"), ("duration", "2"), ("steps", "8,4,4,4"), ("seed", "3")):
        element = driver.find_element(By.ID, element_id)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, "generate").click()
    tokens = driver.find_element(By.ID, "tokens")
    try:
        assert model.held.wait(120)
        WebDriverWait(driver, 30).until(lambda _: tokens.get_attribute("data-done") == "9")
        rows = driver.execute_script("""
            const c = document.getElementById('tokens');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const rows = [];
            for (let r = 0; r < 4; r++) {                      // mean blue level of each codebook's band
              let sum = 0, n = 0;
              for (let y = Math.floor((r + 0.25) * c.height / 4); y < (r + 0.75) * c.height / 4; y++)
                for (let x = 0; x < c.width; x++) { sum += px[4 * (y * c.width + x) + 2]; n++; }
              rows.push(sum / n);
            }
            return rows;""")
        shot = tmp_path / "demo_token_canvas.png"
        driver.save_screenshot(str(shot))
        assert driver.find_element(By.ID, "status").text == "codebook 2/4, step 1/4"
    finally:
        model.gate.set()
    frames = 99   # 2 s at 50 Hz, a multiple of the span length
    assert int(tokens.get_attribute("data-fixed")) == 2 * frames
    assert rows[0] > 250                       # codebook 1: every cell fixed, full shade
    assert 28 + 10 < rows[1] < 250             # codebook 2: filled, shaded by confidence
    assert rows[2] == rows[3] == 28            # codebooks 3-4: masked, dark
    assert shot.stat().st_size > 10_000
    if os.environ.get("MAGNET_SAVE_SCREENSHOT") == "1":
        shutil.copyfile(shot, RESULTS / "demo_token_canvas.png")
    WebDriverWait(driver, 120).until(
        lambda _: driver.find_element(By.ID, "status").get_attribute("data-last-event") == "done")
    assert int(tokens.get_attribute("data-fixed")) == 4 * frames
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# ----------------------------------------------------------------------------- edit, stream, speech
WORDS = [{"word": "hello", "start": 0.10, "end": 0.50}, {"word": "there", "start": 0.55, "end": 0.90},
         {"word": "world", "start": 1.00, "end": 1.60}]


class InfillRecorder:
    """The model, keeping what each /v1/edit call passed to generate_infill and the codes it made."""

    def __init__(self, model):
        self._model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate_infill(self, audio, sample_rate, regions, descriptions, **kwargs):
        wav, tokens = self._model.generate_infill(audio, sample_rate, regions, descriptions, return_tokens=True,
                                                  **kwargs)
        self.calls.append(dict(audio=audio, sample_rate=sample_rate, regions=regions, tokens=tokens))
        return wav


@pytest.fixture(scope="module")
def full_server(tmp_path_factory):
    """The routes `magnet-engine serve --speech DIR` mounts, on tiny random models: a 2 s MAGNeT
    window (so a 5 s stream is several windows, 1 s apart) and the tiny PlayDiffusion."""
    from magnet_engine import PlayDiffusion
    from magnet_engine.engine.playdiffusion.random_weights import write_random_model
    from magnet_engine.server.routes.stream import StreamLimits

    model = InfillRecorder(MAGNeT.from_pretrained(build_random_model(tmp_path_factory.mktemp("window"), "tiny",
                                                                     duration=2), device="cpu", name="demo-tiny-2s"))
    model.extend_stride = 1.0
    speech = PlayDiffusion(str(write_random_model(tmp_path_factory.mktemp("speech"), "tiny", seed=1)), device="cpu")
    app = create_app(model, Settings(note="Demo model with random (untrained) weights: it makes noise, not music."),
                     speech=speech, stream_limits=StreamLimits(max_duration=6))
    with BackgroundServer(app) as url:
        yield url, model


def open_page(driver, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda _: "engine" in driver.find_element(By.ID, "model-line").text)


def fill(driver, **values):
    from selenium.webdriver.common.by import By

    for element_id, value in values.items():
        element = driver.find_element(By.ID, element_id.replace("_", "-"))
        element.clear()
        element.send_keys(value)


def keep_screenshot(driver, tmp_path, name, element_id):
    from selenium.webdriver.common.by import By

    driver.execute_script("arguments[0].scrollIntoView()", driver.find_element(By.ID, element_id))
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("MAGNET_SAVE_SCREENSHOT") == "1":
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, RESULTS / name)


def console_errors(driver, expected: str = "") -> list:
    """The page's SEVERE console entries, less the network log of an error answer provoked on purpose."""
    return [e for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not (expected and e["source"] == "network" and expected in e["message"])]


def noise_wav(path, seconds, rate):
    import numpy as np
    import soundfile as sf

    sf.write(path, (0.1 * np.random.RandomState(0).randn(int(seconds * rate))).astype(np.float32), rate)
    return str(path)


def drag(driver, canvas, start: float, end: float, add: bool = False):
    """Real mouse events (WebDriver actions: CDP Input.dispatchMouseEvent) from `start` to `end`,
    fractions of the canvas width, holding shift when `add`."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    width = canvas.size["width"]
    at = lambda fraction: round((fraction - 0.5) * width)   # offsets are from the element's centre
    chain = ActionChains(driver)
    if add:
        chain.key_down(Keys.SHIFT)
    chain.move_to_element_with_offset(canvas, at(start), 0).click_and_hold().move_by_offset(at(end) - at(start), 0)
    chain.release()
    if add:
        chain.key_up(Keys.SHIFT)
    chain.perform()


def test_demo_page_regenerates_a_dragged_region(driver, full_server, tmp_path):
    """A 4xx from /v1/edit is shown inline; then: generate a clip, drag two regions on its
    waveform (the second with shift), Regenerate: the server gets exactly the selected seconds,
    keeps every codebook cell outside them, and the edited clip plays, its regions highlighted."""
    import torch
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, model = full_server
    open_page(driver, url)
    canvas = driver.find_element(By.ID, "edit-waveform")
    error = driver.find_element(By.ID, "edit-error")

    # an uploaded file longer than the model's window: the route's 400, shown as the service's error
    driver.find_element(By.ID, "edit-file").send_keys(noise_wav(tmp_path / "long.wav", 3, 16000))
    WebDriverWait(driver, 30).until(lambda _: "long.wav: 3.00 s" in driver.find_element(By.ID, "edit-source").text)
    drag(driver, canvas, 0.2, 0.4)
    driver.find_element(By.ID, "edit-run").click()
    WebDriverWait(driver, 30).until(lambda _: error.get_attribute("hidden") is None)
    assert error.text.startswith("400 AudioTooLongError: the clip is 3 s")
    assert not model.calls

    fill(driver, prompt="warm lo-fi piano", duration="2", steps="4,2,2,2", seed="5")
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 60).until(lambda _: "generated.wav" in driver.find_element(By.ID, "edit-source").text)
    assert error.get_attribute("hidden") is not None
    drag(driver, canvas, 0.25, 0.5)
    drag(driver, canvas, 0.7, 0.85, add=True)
    regions = json.loads(driver.find_element(By.ID, "edit-regions").get_attribute("data-regions"))
    assert len(regions) == 2
    for (start, end), (a, b) in zip(regions, [(0.25, 0.5), (0.7, 0.85)]):
        assert start == pytest.approx(a * 1.98, abs=0.01) and end == pytest.approx(b * 1.98, abs=0.01)
    assert driver.find_element(By.ID, "edit-regions").text == ", ".join(f"{a:.2f}–{b:.2f} s" for a, b in regions)

    driver.find_element(By.ID, "edit-run").click()
    status = driver.find_element(By.ID, "edit-status")
    WebDriverWait(driver, 60).until(lambda _: status.text.startswith("regenerated in"))
    playing = "const a = document.getElementById('edit-audio'); return a.readyState >= 2 && a.currentTime > 0.1;"
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(playing))
    assert driver.execute_script("return document.getElementById('edit-audio').duration") == pytest.approx(1.98,
                                                                                                            abs=0.02)

    call = model.calls[-1]
    assert [list(r) for r in call["regions"]] == regions
    with torch.no_grad():    # the uploaded clip's own codes, as the engine encodes a prompt
        source = model.codec.encode(model.codec.preprocess_prompt(call["audio"][None], call["sample_rate"]))
    tokens = call["tokens"]
    frames, span = tokens.shape[-1], model.config.span_len
    source = source[..., :frames]
    kept = torch.ones(frames, dtype=torch.bool)
    for start, end in regions:   # bounds snap outward to frames, then to whole spans
        first, last = int(start * model.frame_rate) - span, int(end * model.frame_rate) + 1 + span
        kept[max(first, 0):last] = False
        inside = slice(int(start * model.frame_rate) + 1, int(end * model.frame_rate))
        assert (tokens[..., inside] != source[..., inside]).any()        # decoded again
    assert kept.sum() > frames // 3
    assert torch.equal(tokens[..., kept], source[..., kept])             # every codebook, bit for bit

    # the edited clip is the one on the canvas now, its regenerated regions shaded amber
    assert driver.find_element(By.ID, "edit-regions").text == "none"
    amber = driver.execute_script("""
        const c = document.getElementById('edit-waveform');
        const red = (f) => c.getContext('2d').getImageData(Math.floor(f * c.width), 0, 1, 1).data[0];
        return [red(arguments[0]), red(arguments[1]), red(0.6), red(0.05)];""",
        (regions[0][0] + regions[0][1]) / 2 / 1.98, (regions[1][0] + regions[1][1]) / 2 / 1.98)
    assert min(amber[:2]) > 80 and max(amber[2:]) < 40
    keep_screenshot(driver, tmp_path, "demo_region_edit.png", "edit-box")
    assert not console_errors(driver, expected="/v1/edit - Failed to load resource: the server responded with a "
                                               "status of 400")


def test_demo_page_streams_long_form_gaplessly(driver, full_server, tmp_path):
    """5 s from a 2 s window: a duration over the route's limit is refused inline; then the
    chunks arrive over SSE, each scheduled where the previous one ends, play in order, and the
    first is heard before the last window is decoded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = full_server
    open_page(driver, url)
    assert driver.find_element(By.ID, "stream-duration").get_attribute("value") == "6"   # 3 windows
    assert driver.find_element(By.ID, "stream-duration").get_attribute("max") == "6"     # the route's limit
    error = driver.find_element(By.ID, "stream-error")
    fill(driver, prompt="slow strings", steps="4,2,2,2", seed="1", stream_duration="7")
    driver.find_element(By.ID, "stream-run").click()
    WebDriverWait(driver, 30).until(lambda _: error.get_attribute("hidden") is None)
    assert error.text.startswith("422 InvalidOptionError: duration must be in (0, 6] s")

    fill(driver, stream_duration="5")
    driver.find_element(By.ID, "stream-run").click()
    finished = "const s = window.streamState; return s.finished && s.ended.length === s.chunks.length;"
    WebDriverWait(driver, 90).until(lambda d: d.execute_script(finished))
    assert error.get_attribute("hidden") is not None
    state = driver.execute_script("const s = window.streamState; return {chunks: s.chunks, ended: s.ended, "
                                  "first: s.firstAudioMs, total: s.totalMs, gaps: s.gaps, done: s.done};")
    chunks = state["chunks"]
    assert len(chunks) == state["done"]["chunks"] > 2                      # several windows, each its own chunk
    assert [c["index"] for c in chunks] == state["ended"] == list(range(len(chunks)))
    assert sum(c["seconds"] for c in chunks) == pytest.approx(state["done"]["seconds"])
    assert state["done"]["seconds"] == pytest.approx(5, abs=0.03)
    late = 0
    for before, after in zip(chunks, chunks[1:]):
        end = before["when"] + before["seconds"]
        assert after["when"] >= end - 1e-9                                  # never overlapping
        late += after["when"] > end + 1e-6
    assert late == state["gaps"]       # back to back, but where decoding fell behind playback (counted on the page)
    assert 0 < state["first"] < state["total"]
    js_round = lambda ms: math.floor(ms + 0.5)   # Math.round: halves up
    assert driver.find_element(By.ID, "s-first").text == f"{js_round(state['first'])} ms"
    assert driver.find_element(By.ID, "s-total").text == f"{js_round(state['total'])} ms"
    assert driver.find_element(By.ID, "stream-status").text.startswith(f"done: {len(chunks)} chunks")
    keep_screenshot(driver, tmp_path, "demo_stream.png", "stream-box")
    assert not console_errors(driver, expected="/v1/stream - Failed to load resource: the server responded with "
                                               "a status of 422")


def test_demo_page_speech_tab_edits_a_recording(driver, full_server, tmp_path):
    """`--speech` mounted: the tab is on with the route's defaults; texts that do not differ get
    the route's 400 inline; a real edit plays, with its phase timings and a download link."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = full_server
    open_page(driver, url)
    tab = driver.find_element(By.ID, "tab-speech")
    WebDriverWait(driver, 30).until(lambda _: tab.get_attribute("data-ready") == "true")
    assert driver.find_element(By.ID, "speech-panel").get_attribute("hidden") is not None
    tab.click()
    assert driver.find_element(By.ID, "music-panel").get_attribute("hidden") is not None
    assert driver.find_element(By.ID, "speech-steps").get_attribute("value") == "30"      # upstream's default
    assert json.loads(driver.find_element(By.ID, "speech-times").get_attribute("value")) == WORDS  # the example
    driver.find_element(By.ID, "speech-audio").send_keys(noise_wav(tmp_path / "speech.wav", 2, 16000))
    fill(driver, speech_from="hello there world", speech_to="hello there world", speech_steps="3", speech_seed="4")
    error = driver.find_element(By.ID, "speech-error")
    driver.find_element(By.ID, "speech-run").click()
    WebDriverWait(driver, 60).until(lambda _: error.get_attribute("hidden") is None)
    assert error.text.startswith("400 BadRequest: ") and "do not differ" in error.text

    fill(driver, speech_to="hello big world")
    driver.find_element(By.ID, "speech-run").click()
    playing = "const a = document.getElementById('speech-player'); return a.readyState >= 2 && a.currentTime > 0.1;"
    WebDriverWait(driver, 120).until(lambda d: d.execute_script(playing))
    assert error.get_attribute("hidden") is not None
    assert driver.find_element(By.ID, "speech-status").text == "done"
    assert int(driver.find_element(By.ID, "p-units").text) > 0
    for phase in ("tokenize", "plan", "unmask", "vocode", "total"):
        assert driver.find_element(By.ID, f"p-{phase}").text.endswith(" ms")
    link = driver.find_element(By.ID, "speech-download")
    assert link.get_attribute("href").startswith("blob:") and link.get_attribute("download") == "speech_edit.wav"
    wav = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then((r) => r.arrayBuffer()).then((b) => done(Array.from(new Uint8Array(b, 0, 44))));""",
        link.get_attribute("href"))
    assert bytes(wav[:4]) == b"RIFF" and int.from_bytes(bytes(wav[24:28]), "little") == 24000   # the vocoder's rate
    keep_screenshot(driver, tmp_path, "demo_speech.png", "speech-panel")
    assert not console_errors(driver, expected="/v1/speech/edit - Failed to load resource: the server responded "
                                               "with a status of 400")
