"""A headless Chromium driven by Selenium, for the playground's browser test and its screenshots.

Uses the system's browser and driver (Debian: ``apt-get install chromium chromium-driver``), never
a downloaded one: Selenium is given both paths and runs with ``SE_OFFLINE=true``, so Selenium
Manager never reaches out. ``ONEGEN_CHROMIUM`` / ``ONEGEN_CHROMEDRIVER`` point at others.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import Any

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER_PATHS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def find_chromium() -> tuple[str | None, str | None]:
    """(browser binary, chromedriver binary); None for what is not installed."""
    browser = os.environ.get("ONEGEN_CHROMIUM") or next(filter(None, map(shutil.which, BROWSER_NAMES)), None)
    driver = os.environ.get("ONEGEN_CHROMEDRIVER") or shutil.which("chromedriver") or next(
        (p for p in DRIVER_PATHS if os.access(p, os.X_OK)), None)
    return browser, driver


def missing_browser() -> str | None:
    """Why no browser test can run here (None when one can)."""
    browser, driver = find_chromium()
    if browser is None:
        return f"no Chromium found (looked for {', '.join(BROWSER_NAMES)}; apt-get install chromium chromium-driver)"
    if driver is None:
        return "no chromedriver found (apt-get install chromium-driver, or set ONEGEN_CHROMEDRIVER)"
    return None


def start_chromium(width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium at ``width`` x ``height`` CSS pixels whose console is readable (``console_errors``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    problem = missing_browser()
    if problem is not None:
        raise RuntimeError(problem)
    browser, driver = find_chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a browser or driver
    options = Options()
    options.binary_location = browser  # type: ignore[assignment]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
                f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    set_viewport(chrome, width, height)
    return chrome


def set_viewport(chrome: Any, width: int, height: int, mobile: bool = False) -> None:
    """Make the page's viewport exactly ``width`` x ``height`` (a phone's with ``mobile``)."""
    chrome.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def console_errors(chrome: Any) -> list[dict]:
    """The browser console's SEVERE entries since the last call (reading the log empties it)."""
    return [e for e in chrome.get_log("browser") if e.get("level") == "SEVERE"]


def full_page_png(chrome: Any, path: str | Path) -> Path:
    """Save the whole page (not just the viewport) as a PNG, at the viewport's width."""
    metrics = chrome.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    width = chrome.execute_script("return document.documentElement.clientWidth")
    shot = chrome.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1},
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
