"""The page in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium) against a real
`gesso serve` (tests/serve/serve_testutil.py's Server). Every wait is on something the page shows, bounded, never a
fixed sleep. After each test the browser's console must hold no error, and every resource the page loaded must come
from the server's own origin. Screenshots of each state go to SCREENSHOTS (README, "The page")."""
import json
import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from serve_testutil import DEMO_DIR, SHORT, Server  # noqa: E402

SCREENSHOTS = Path(os.environ.get("GESSO_SCREENSHOTS") or Path(__file__).resolve().parent / "screenshots")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WAIT_S = 240  # the longest the page may take to show something: a server busy training on a loaded 2-core machine
__all__ = ["DEMO_DIR", "SHORT", "Server", "browser", "close", "console_errors", "demo_toml", "foreign_resources",
           "needs_chromium", "overflow", "screenshot", "tab_to", "unlabelled", "wait_for"]


def needs_chromium():
    """Skip without chromium and chromedriver, except in CI (CI=true), where the page's tests must run: fail."""
    if CHROMIUM and DRIVER:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but chromium or chromedriver is missing: .ci/run installs them (apt-get install chromium chromium-driver)")
    pytest.skip("no chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")


def demo_toml(folder: Path, *overrides: str) -> Path:
    """The tests' demo (tiny-sdxl) shortened as the serve tests shorten it, with `overrides`, written into `folder`
    beside a copy of its images: the config the page's "demo" choice submits."""
    from gesso.engine.config.load import apply_overrides

    shutil.copytree(DEMO_DIR / "demo", folder / "demo")
    data = apply_overrides(tomllib.loads((DEMO_DIR / "demo.toml").read_text()), [*SHORT, *overrides])
    # the demo's values are strings, numbers, booleans and lists of strings: JSON spells them as TOML does
    toml = "".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()) for section, table in data.items())
    (folder / "demo.toml").write_text(toml)
    return folder / "demo.toml"


def browser(width: int = 1200, height: int = 1000):
    """Headless Chromium in a fresh profile, its console log kept (goog:loggingPrefs)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="gesso-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.profile_dir = profile
    return driver


def close(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def console_errors(driver, expected: tuple[str, ...] = ()) -> list[str]:
    """The SEVERE entries of the console since the last call, less those holding one of `expected` (the API's 4xx
    answers a test provokes on purpose, which Chromium logs as failed loads)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(x in e["message"] for x in expected)]


def foreign_resources(driver, origin: str) -> list[str]:
    """Every resource the page loaded (Resource Timing) from anywhere but `origin`."""
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    own = urlsplit(origin)
    return [n for n in names if (urlsplit(n).scheme, urlsplit(n).netloc) != (own.scheme, own.netloc) and not n.startswith("blob:")]


def screenshot(driver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot {path}"
    return path


def wait_for(driver, condition, what: str, timeout: float = WAIT_S, server: Server | None = None):
    """condition(driver)'s first truthy value, polled; a failure names `what` and the server's last output."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:  # an element the page re-rendered while it was read: read again
        return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]).until(condition)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}" + (f"\n{server.output()}" if server else "")) from None


def tab_to(driver, element, presses: int = 60) -> None:
    """Press Tab until `element` has the focus, as a keyboard user reaches it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver.execute_script("document.activeElement && document.activeElement.blur(); window.focus()")
    for _ in range(presses):
        if driver.execute_script("return document.activeElement === arguments[0]", element):
            return
        ActionChains(driver).send_keys(Keys.TAB).perform()
    raise AssertionError(f"{element.text or element.tag_name}: not reached by {presses} presses of Tab")


def overflow(driver) -> int:
    """How many pixels the page is wider than the window: 0 when nothing overflows horizontally."""
    return driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")


def unlabelled(driver) -> list[str]:
    """The ids of inputs (not hidden) without a label or an aria-label."""
    return driver.execute_script("""return [...document.querySelectorAll('input, select, textarea')]
        .filter(e => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
        .map(e => e.id || e.outerHTML)""")
