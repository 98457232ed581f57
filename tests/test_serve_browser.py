"""The page at ``/`` in a real browser: headless Chromium from Debian, driven by Selenium.

Selenium uses the system chromedriver (``/usr/bin/chromedriver``, from the ``chromium-driver``
package that scripts/setup.sh installs) and never Selenium Manager's download (SE_OFFLINE). The
page uploads a voice, synthesizes a sentence with it and must end with a playable audio element
of non-zero duration; a screenshot is saved in the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from serve_support import export_zoo, make_voices, start_server, utterances

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(tiny_runs, prepared_corpus, tmp_path_factory):
    zoo = export_zoo(tiny_runs, tmp_path_factory.mktemp("browser_zoo"))
    voices = make_voices(prepared_corpus, tmp_path_factory.mktemp("browser_voices"))
    srv = start_server(zoo, voices, max_ar_steps=40)
    yield srv
    srv.running.stop()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (requirements.txt pins it)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = next((b for b in CHROMIUM if Path(b).is_file()), None)
    if binary is None or not Path(CHROMEDRIVER).is_file():
        pytest.fail("the browser test needs Debian's Chromium and its driver: apt-get install -y chromium chromium-driver "
                    "(scripts/setup.sh installs them)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download a browser or driver
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000",
                "--autoplay-policy=no-user-gesture-required", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--mute-audio"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_uploads_a_voice_synthesizes_and_plays(server, browser, prepared_corpus, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    utts = utterances(prepared_corpus)
    driver, wait = browser, WebDriverWait(browser, 120, poll_frequency=0.1)
    driver.get(server.url + "/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "voice")).options) == 2
               and d.find_element(By.ID, "voice").get_attribute("value") == "alice")
    warning = driver.find_element(By.ID, "codec-warning")
    assert warning.is_displayed() and "not speech" in warning.text  # the codec is untrained: said plainly
    assert "ar-tiny + nar-tiny" in driver.find_element(By.ID, "model-info").text

    # upload a voice through the page (the browser sends the file's bytes)
    recording = tmp_path / "dana.wav"
    shutil.copy(utts[3][0], recording)
    driver.find_element(By.CSS_SELECTOR, "#upload summary").click()
    driver.find_element(By.ID, "upload-file").send_keys(str(recording))
    driver.find_element(By.ID, "upload-transcript").send_keys(utts[3][1])
    driver.find_element(By.ID, "upload-name").send_keys("dana")
    driver.find_element(By.ID, "upload-button").click()
    wait.until(lambda d: d.find_element(By.ID, "voice").get_attribute("value") == "dana")
    assert (server.voices / "dana.wav").is_file()

    text = driver.find_element(By.ID, "text")
    text.clear()
    text.send_keys(utts[1][1])
    seed = driver.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("7")
    top_p = driver.find_element(By.ID, "top_p")
    top_p.clear()
    top_p.send_keys("0.9")
    driver.find_element(By.ID, "synthesize").click()

    state = "const a = document.getElementById('audio'); return [a.readyState, a.duration, a.error && a.error.code];"
    wait.until(lambda d: d.execute_script(state)[0] >= 1)  # metadata loaded
    ready, duration, error = driver.execute_script(state)
    assert error is None and duration > 0, (ready, duration, error)
    played = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; const a = document.getElementById('audio');"
        "a.play().then(() => done(!a.paused)).catch((e) => done(String(e)));")
    assert played is True, played
    assert not driver.find_element(By.ID, "error").is_displayed()
    shown = float(driver.find_element(By.ID, "stat-duration").text.split()[0])
    assert shown == pytest.approx(duration, abs=0.02)
    assert driver.find_element(By.ID, "stat-rtf").text.split()[0].replace(".", "", 1).isdigit()
    assert driver.find_element(By.ID, "stat-cut").text  # cut or not, it says so
    assert driver.find_element(By.ID, "stat-seed").text == "7"
    href = driver.find_element(By.ID, "download").get_attribute("href")
    assert href.startswith("blob:")

    shot = tmp_path / "page.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("VALL_E_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["VALL_E_SCREENSHOT"])

    # a refused request shows the server's message on the page, and the next one works again
    top_p.clear()
    top_p.send_keys("0")
    driver.find_element(By.ID, "synthesize").click()
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "top_p must be within (0, 1]" in driver.find_element(By.ID, "error").text
    top_p.clear()
    top_p.send_keys("1")
    driver.execute_script("document.getElementById('audio').removeAttribute('src'); document.getElementById('audio').load();")
    driver.find_element(By.ID, "synthesize").click()
    wait.until(lambda d: not d.find_element(By.ID, "error").is_displayed() and d.execute_script(state)[0] >= 1)
