"""The dashboard page in a real browser: Debian's Chromium, headless, driven by Selenium through
Debian's chromedriver (Selenium Manager is never asked to download anything), against the
processor run as ``python -m gateway processor run`` on the real Kafka and InfluxDB.

Two plants send an hour of readings; the page shows them, takes a new reading live without a
reload, and asks nothing of any server but the processor. Screenshots (a control-room screen and
a phone) go to ``var/screenshots/``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from gateway.common.model import Quality, Reading
from tests.support.processor_harness import Processor, RawProducer, live_processor
from tests.support.services import ROOT
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = ROOT / "var" / "screenshots"

# sensor, parameter, unit, gateway, base value, swing, noise
PROBES = [
    ("ph-1", "pH", "pH", "gw-1", 7.2, 0.25, 0.04),
    ("bod-1", "BOD", "mg/L", "gw-1", 18.0, 3.0, 1.2),
    ("cod-1", "COD", "mg/L", "gw-1", 180.0, 25.0, 6.0),
    ("tss-1", "TSS", "mg/L", "gw-2", 60.0, 12.0, 3.0),
    ("tds-1", "TDS", "mg/L", "gw-1", 620.0, 25.0, 5.0),
    ("temp-1", "temperature", "°C", "gw-1", 18.5, 0.6, 0.08),
    ("flow-1", "flow_rate", "m3/h", "gw-1", 150.0, 20.0, 2.5),
]


def an_hour_of(plant: str, end: float, *, seed: int, bod_rise: float = 0.0) -> list[Reading]:
    """Readings every 20 s for the hour up to ``end``; BOD climbs by ``bod_rise`` over it."""
    rnd = random.Random(seed)
    out = []
    for k in range(180):
        ts = end - 3600 + k * 20
        phase = k / 180
        for sensor, parameter, unit, gw, base, swing, noise in PROBES:
            value = base + swing * math.sin(phase * 2 * math.pi + seed) + rnd.gauss(0, noise)
            if parameter == "BOD":
                value += bod_rise * phase * phase
            out.append(
                Reading(
                    sensor,
                    parameter,
                    round(value, 3),
                    unit,
                    ts,
                    plant_id=plant,
                    location="inlet" if gw == "gw-1" else "clarifier",
                    gateway_id=f"{plant[-5:]}-{gw}",
                    seq=len(out),
                )
            )
    return out


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium and chromium-driver are not installed: run scripts/install")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, were it asked: no downloads
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1600,1150",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def processor(servers, tmp_path) -> Iterator[tuple[Processor, str]]:
    with live_processor(servers, tmp_path, "north", "south") as serving:
        yield serving


def _history(base: str, plant: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/api/history?plant={plant}", timeout=10) as r:
        return json.loads(r.read())["windows"]


def _tile_value(driver: webdriver.Chrome, plant: str, parameter: str) -> str:
    sel = f'section[data-plant="{plant}"] .tile[data-parameter="{parameter}"] .value'
    found = driver.find_elements(By.CSS_SELECTOR, sel)
    return found[0].text if found else ""


def test_the_dashboard_shows_each_plant_live_and_asks_only_its_server(processor, servers, browser):
    proc, base = processor
    north, south = proc.data.plants
    kafka = RawProducer(servers)
    end = time.time() - 20
    readings = an_hour_of(north, end, seed=1, bod_rise=17.0) + an_hour_of(south, end, seed=2)
    readings.sort(key=lambda r: r.timestamp)
    for r in readings[-len(PROBES) :]:
        if r.plant_id == south and r.parameter == "TDS":
            r.quality, r.quality_reasons = Quality.UNCERTAIN, ["spike"]
    kafka.send(readings)
    # Windows close as the hour goes by; the last one once the plant is idle (6 s here). The
    # chart needs every parameter's windows and BOD's whole hour (the rise the page shows); that
    # every window of the hour is stored is the processor tests' subject (windows equal raw).
    # Under a full test run's load a partition's early windows once stayed missing past 90 s
    # (see the closing note); this test waits for what the page needs.
    want = 59 + len(PROBES) - 1
    seen: list[int] = [0]

    def an_hour_stored() -> bool:
        per = Counter(w["parameter"] for w in _history(base, north))
        seen.append(sum(per.values()))
        return per["BOD"] >= 59 and len(per) == len(PROBES)

    try:
        wait_until(an_hour_stored, 120, "BOD's hour of windows and every parameter's")
    except AssertionError as e:
        per = Counter(w["parameter"] for w in _history(base, north))
        try:
            health = urllib.request.urlopen(f"{base}/health", timeout=10).read().decode()
        except urllib.error.HTTPError as unhealthy:
            health = unhealthy.read().decode()
        detail = f"{seen[-1]}/{want} windows {per}\n{health}\n{proc.logs()}"
        raise AssertionError(f"{e}: {detail}") from None

    browser.get(base + "/")
    wait_until(lambda: _tile_value(browser, north, "BOD") not in ("", "—"), 30, "BOD on the page")
    wait_until(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, ".chart canvas")) >= 2 * len(PROBES),
        30,
        "every chart drawn",
    )
    assert browser.find_elements(By.CSS_SELECTOR, f'section[data-plant="{north}"] .alarm')

    # A new reading changes the page without a reload.
    marker = browser.execute_script("return window.performance.timeOrigin")
    gw = f"{north[-5:]}-gw-1"
    kafka.send([Reading("ph-1", "pH", 7.77, "pH", time.time(), plant_id=north, gateway_id=gw)])
    wait_until(lambda: _tile_value(browser, north, "pH") == "7.77", 15, "the new pH on the page")
    assert browser.execute_script("return window.performance.timeOrigin") == marker

    time.sleep(1.0)  # let the last chart frame paint
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "dashboard.png"))
    browser.set_window_size(412, 2400)  # a phone's width, tall enough for one plant
    time.sleep(1.0)
    browser.save_screenshot(str(SCREENSHOTS / "dashboard-phone.png"))

    urls = []
    for entry in browser.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        if event["method"] == "Network.requestWillBeSent":
            urls.append(event["params"]["request"]["url"])
        elif event["method"] == "Network.webSocketCreated":
            urls.append(event["params"]["url"])
    origin, ws_origin = base + "/", base.replace("http://", "ws://", 1) + "/"
    assert urls and any(u.startswith(ws_origin + "ws") for u in urls), urls
    assert [u for u in urls if not u.startswith((origin, ws_origin))] == []
    problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert problems == []
    assert os.path.getsize(SCREENSHOTS / "dashboard.png") > 10_000
