"""The demo page in headless Chromium: type a prompt, Generate, get a playable wav.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package. The screenshot
lands in the test's tmp dir; with MAGNET_SAVE_SCREENSHOT=1 also in
benchmarks/results/demo_page.png (a plain test run never writes into the source tree).
"""
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
                 "--disable-dev-shm-usage", "--window-size=1000,1000", f"--user-data-dir={tmp_path / 'profile'}"):
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
