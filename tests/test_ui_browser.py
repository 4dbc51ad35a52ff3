"""
The status page in a real browser: Debian's chromium, headless, driven by
Selenium through Debian's chromedriver (nothing downloads a browser:
Selenium Manager must not run), against `twistd -n contentcache` with two
workers after real traffic from the npm and Go upstream fixtures. One
daemon and one browser for the module.

Screenshots of / at 1280x800 and 390x844 are kept in test-artifacts/ui/
at the repository's root (ignored by git).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .daemon import Daemon
from .gomodules import GREET, HELLO, build_tree, modules
from .npmpackages import LEAF, PACKAGES, RegistryFixture, pack
from .upstream import UpstreamFixture

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the test extras install it
    pytest.fail("selenium is missing: run the README's test command", pytrace=False)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts", "ui")
XSS = "<script>alert(1)</script>"
FETCHED_NPM = ["1.0.0", "1.1.0"]  # of cc-fixture-leaf; 2.0.0-beta.1 is upstream only
FETCHED_GO = ["v1.0.0", "v1.2.0"]  # of example.com/greet; its pseudo-version is upstream only

for program in (CHROMIUM, CHROMEDRIVER):
    if not os.path.exists(program):  # pragma: no cover - the test command installs them
        pytest.fail(f"{program} is missing: run the README's test command (Debian's chromium, "
                    "chromium-driver)", pytrace=False)


def raw_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """
    A GET of C{path} sent as it is (no quoting: a name with < and > in it).
    """
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = str(tmp_path_factory.mktemp("packages"))
    packed = [(p, pack(p, work)) for p in PACKAGES if p.name == LEAF]
    registry = RegistryFixture(str(tmp_path_factory.mktemp("registry")), packed)
    goproxy = UpstreamFixture(build_tree(str(tmp_path_factory.mktemp("proxy")), modules()))
    storage = str(tmp_path_factory.mktemp("storage"))
    daemon = Daemon(storage, [
        "--workers", "2", "--go-upstream", goproxy.url, "--go-sumdb", "off", "--npm-upstream", registry.url,
        "--go-metadata-ttl", "0s", "--npm-metadata-ttl", "1s", "--max-size", "64MiB",
    ])
    try:
        traffic(daemon, registry, goproxy)
        yield {"daemon": daemon, "storage": storage, "registry": registry, "goproxy": goproxy}
    finally:
        daemon.stop()
        registry.stop()
        goproxy.stop()


def traffic(daemon: Daemon, registry: RegistryFixture, goproxy: UpstreamFixture) -> None:
    """
    What a build does, twice (misses, then hits through either worker), an
    upstream failing (a stale list, a 502), and requests for names that
    are markup.
    """
    for _ in range(2):
        for accept in ("application/json", "application/vnd.npm.install-v1+json"):
            assert raw_get(daemon.url, f"/npm/{LEAF}", {"Accept": accept})[0] == 200
        for version in FETCHED_NPM:
            assert raw_get(daemon.url, f"/npm/{LEAF}/-/{LEAF}-{version}.tgz")[0] == 200
        for version in FETCHED_GO:
            for ext in ("info", "mod", "zip"):
                assert raw_get(daemon.url, f"/goproxy/{GREET}/@v/{version}.{ext}")[0] == 200
    # A packument past its TTL: answered at once, revalidated behind.
    time.sleep(1.2)
    status, headers, _ = raw_get(daemon.url, f"/npm/{LEAF}")
    assert (status, headers.get("x-cache"), headers.get("warning", "")[:3]) == (200, "STALE", "110")
    assert raw_get(daemon.url, f"/goproxy/{GREET}/@v/list")[0] == 200
    goproxy.override[f"/{GREET}/@v/list"] = (500, b"down\n")
    goproxy.override[f"/{HELLO}/@v/v1.0.0.info"] = (500, b"down\n")
    status, headers, _ = raw_get(daemon.url, f"/goproxy/{GREET}/@v/list")
    assert (status, headers.get("x-cache")) == (200, "STALE")
    assert raw_get(daemon.url, f"/goproxy/{HELLO}/@v/v1.0.0.info")[0] == 502
    for path in (f"/npm/{XSS}", f"/goproxy/example.com/{XSS}/@v/list"):
        assert raw_get(daemon.url, path)[0] == 404
    time.sleep(1.5)  # every worker has written what it recorded


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    from selenium.webdriver.common import selenium_manager

    def refuse(*args: object, **kwargs: object) -> dict[str, str]:
        raise AssertionError("Selenium Manager ran: it would download a browser or driver")

    original = selenium_manager.SeleniumManager.binary_paths
    selenium_manager.SeleniumManager.binary_paths = refuse  # type: ignore[method-assign]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        selenium_manager.SeleniumManager.binary_paths = original  # type: ignore[method-assign]


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def no_alert(driver: WebDriver) -> None:
    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        return
    text = alert.text
    alert.dismiss()
    raise AssertionError(f"a script ran: an alert said {text!r}")


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = raw_get(daemon.url, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def total(samples: dict[Any, float], name: str, **match: Any) -> float:
    found = 0.0
    for (sample, labels), value in samples.items():
        labelled = dict(labels)
        if sample == name and all(labelled.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in match.items()):
            found += value
    return found


def load(driver: WebDriver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")


def test_status_page_figures_are_what_metrics_and_stats_say(setup: dict[str, Any], browser: WebDriver) -> None:
    daemon = setup["daemon"]
    browser.set_window_size(1280, 800)
    browser.get_log("browser")  # what came before is not this page's
    samples = scrape(daemon)
    load(browser, daemon.url + "/")
    hits = total(samples, "contentcache_requests_total", cache_result=("hit", "stale", "revalidating"))
    misses = total(samples, "contentcache_requests_total", cache_result="miss")
    assert hits > 0 and misses > 0
    assert total(samples, "contentcache_requests_total", cache_result="revalidating") >= 1
    shown = browser.find_element(By.CSS_SELECTOR, "#hit-ratio [data-ratio]")
    assert float(shown.get_attribute("data-ratio") or "nan") == pytest.approx(hits / (hits + misses))
    assert f"{hits / (hits + misses) * 100:.1f}%" in shown.text
    served = total(samples, "contentcache_response_bytes_total",
                   cache_result=("hit", "stale", "revalidating", "miss"))
    fetched = total(samples, "contentcache_upstream_bytes_total")
    assert served > fetched > 0
    saved = browser.find_element(By.CSS_SELECTOR, "#saved [data-bytes]")
    assert int(saved.get_attribute("data-bytes") or -1) == int(served - fetched)

    # The charts hold points: the sample each worker took at its start,
    # and now.
    for chart in ("chart-rps", "chart-hit-ratio"):
        points = browser.find_elements(By.CSS_SELECTOR, f"#{chart} circle.point")
        assert len(points) >= 1, chart
        assert {p.get_attribute("data-series") for p in points} == {"all", "go", "npm"}, chart

    # The store bar and the entries are what `contentcache stats` says.
    stats = json.loads(subprocess.run(
        [sys.executable, "-m", "contentcache.cli", "stats", "--json", "--storage", setup["storage"]],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout)
    bar = browser.find_element(By.ID, "store-bar")
    assert int(bar.get_attribute("data-stored") or -1) == stats["stored_bytes"]
    assert int(bar.get_attribute("data-max") or -1) == 64 << 20
    for protocol, count in stats["entries"].items():
        cell = browser.find_element(By.CSS_SELECTOR, f'[data-entries="{protocol}"]')
        assert cell.text.replace(",", "") == str(count)
    assert browser.find_element(By.ID, "store-blobs").text.replace(",", "") == str(stats["blobs"])

    # The Go upstream failed last, with its reason; its list is served stale.
    go_row = browser.find_element(By.CSS_SELECTOR, f'[data-upstream="{setup["goproxy"].url}"]')
    cells = go_row.find_elements(By.TAG_NAME, "td")
    assert "upstream answered 500" in cells[3].text
    assert cells[-1].text.startswith("yes")
    assert not console_errors(browser), console_errors(browser)


def test_the_activity_is_every_workers(setup: dict[str, Any]) -> None:
    # Whichever worker answers, what both recorded: the requests for each
    # name (spread over both workers), the upstream's last failure.
    daemon = setup["daemon"]
    for _ in range(4):
        status, _, body = raw_get(daemon.url, "/-/stats")
        figures = json.loads(body)
        assert figures["processes_reporting"] == 2
        top = {(t["protocol"], t["name"]): t["requests"] for t in figures["top"]}
        assert top[("go", GREET)] == 2 * len(FETCHED_GO) * 3 + 2
        assert top[("npm", LEAF)] == 2 * (2 + len(FETCHED_NPM)) + 1  # and the packument past its TTL
        [go] = [u for u in figures["upstreams"] if u["protocol"] == "go"]
        assert go["reason"] == "upstream answered 500" and go["failing"] and go["serving_stale"]


def test_the_page_refreshes_itself_without_errors(setup: dict[str, Any], browser: WebDriver) -> None:
    daemon = setup["daemon"]
    browser.set_window_size(1280, 800)
    load(browser, daemon.url + "/")
    browser.get_log("browser")
    browser.execute_script("document.querySelector('main').dataset.seen = 'yes'")
    before = browser.find_element(By.CSS_SELECTOR, "#requests .value").text
    for _ in range(3):
        raw_get(daemon.url, f"/goproxy/{GREET}/@v/v1.0.0.info")
    WebDriverWait(browser, 25).until(
        lambda d: d.execute_script("return document.querySelector('main').dataset.seen") is None
    )
    after = browser.find_element(By.CSS_SELECTOR, "#requests .value").text
    assert int(after.replace(",", "")) > int(before.replace(",", ""))
    assert not console_errors(browser), console_errors(browser)


def test_screenshots(setup: dict[str, Any], browser: WebDriver) -> None:
    os.makedirs(ARTIFACTS, exist_ok=True)
    saved = []
    for width, height in ((1280, 800), (390, 844)):
        browser.set_window_size(width, height)
        load(browser, setup["daemon"].url + "/")
        # The viewport is what the window shows; a full page beside it.
        viewport = os.path.join(ARTIFACTS, f"status-{width}x{height}.png")
        assert browser.save_screenshot(viewport)
        full_height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(width, max(height, int(full_height)))
        full = os.path.join(ARTIFACTS, f"status-{width}x{height}-full.png")
        assert browser.save_screenshot(full)
        saved += [viewport, full]
        # Nothing runs off the side on a phone.
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width + 1
    for path in saved:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    print("screenshots of the status page:", *saved, sep="\n  ")
    assert not console_errors(browser), console_errors(browser)


def test_package_views_list_exactly_the_versions_fetched(setup: dict[str, Any], browser: WebDriver) -> None:
    daemon = setup["daemon"]
    browser.set_window_size(1280, 800)
    browser.get_log("browser")
    for path, fetched, protocol, name in ((f"/-/ui/npm/{LEAF}", FETCHED_NPM, "npm", LEAF),
                                          (f"/-/ui/go/{GREET}", FETCHED_GO, "go", GREET)):
        load(browser, daemon.url + path)
        os.makedirs(ARTIFACTS, exist_ok=True)
        browser.save_screenshot(os.path.join(ARTIFACTS, f"package-{protocol}.png"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#versions tbody tr")
        assert [r.get_attribute("data-version") for r in rows] == fetched
        assert browser.find_element(By.ID, "purge").text == (
            f"contentcache purge --storage {setup['storage']} {protocol} {name}"
        )
    # The npm view shows each tarball's integrity as the packument gave it.
    load(browser, daemon.url + f"/-/ui/npm/{LEAF}")
    leaf = json.loads(setup["registry"].override[f"/{LEAF}"][1])
    for version in FETCHED_NPM:
        row = browser.find_element(By.CSS_SELECTOR, f'#versions tr[data-version="{version}"]')
        assert leaf["versions"][version]["dist"]["integrity"] in row.text
    # Found from the box on /.
    load(browser, daemon.url + "/")
    box = browser.find_element(By.CSS_SELECTOR, "header input[name=q]")
    box.send_keys("cc-fixture")
    box.submit()
    WebDriverWait(browser, 10).until(lambda d: "/-/ui/search" in d.current_url)
    links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#results a")]
    assert links == [LEAF]
    assert not console_errors(browser), console_errors(browser)


def test_a_name_that_is_markup_never_runs(setup: dict[str, Any], browser: WebDriver) -> None:
    daemon = setup["daemon"]
    browser.set_window_size(1280, 800)
    browser.get_log("browser")
    # On /: the requests for it are among the last errors, as text.
    load(browser, daemon.url + "/")
    no_alert(browser)
    errors = browser.find_element(By.ID, "errors-table").text
    assert f"/npm/{XSS}" in errors and f"/goproxy/example.com/{XSS}/@v/list" in errors
    assert not browser.find_elements(By.CSS_SELECTOR, "#errors-table script")
    # The package view and the search say the name, as text.
    for path, where in ((f"/-/ui/npm/{XSS}", "not-found"), (f"/-/ui/go/example.com/{XSS}", "not-found"),
                        (f"/-/ui/search?q={XSS}", "query")):
        load(browser, daemon.url + path)
        no_alert(browser)
        assert XSS in browser.find_element(By.ID, where).text, path
        assert not browser.find_elements(By.CSS_SELECTOR, "main script")
        # A name that is none is answered 404, which the browser logs;
        # nothing else may be.
        page = browser.current_url
        unexpected = [x for x in console_errors(browser)
                      if not (x["source"] == "network" and x["message"].startswith(page + " ")
                              and "404" in x["message"])]
        assert not unexpected, unexpected
