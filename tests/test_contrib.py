"""
contrib/: the Prometheus alert rules pass promtool (Debian's prometheus
package) and its unit tests of them (contrib/prometheus/alerts_test.yml), every expression of the Grafana dashboard is PromQL promtool
accepts, and every metric either uses is in /metrics of a real daemon with
workers, from its start and after traffic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any, Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .daemon import Daemon
from .gomodules import GREET, build_tree, modules
from .test_goproxy import request
from .upstream import UpstreamFixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALERTS = os.path.join(ROOT, "contrib", "prometheus", "alerts.yml")
ALERT_TESTS = os.path.join(ROOT, "contrib", "prometheus", "alerts_test.yml")
DASHBOARD = os.path.join(ROOT, "contrib", "grafana", "contentcache.json")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
METRIC = re.compile(r"\bcontentcache_[a-z_]+\b")
#: What Grafana puts in an expression before Prometheus sees it.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$job": ".*"}

if not os.path.exists(PROMTOOL):  # pragma: no cover - the test command installs it
    pytest.fail("promtool is missing: run the README's test command (Debian's prometheus package)", pytrace=False)


def dashboard_expressions() -> list[str]:
    with open(DASHBOARD, encoding="utf-8") as f:
        document = json.load(f)
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    return found


def alert_expressions() -> list[str]:
    with open(ALERTS, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout
    names = {rule["alert"] for group in yaml.safe_load(open(ALERTS))["groups"] for rule in group["rules"]}
    assert names == {
        "ContentcacheUpstreamFailing", "ContentcacheServingStale", "ContentcacheHitRatioFallen",
        "ContentcacheStoreNearlyFull", "ContentcacheDiskFull", "ContentcacheDiskNearlyFull",
        "ContentcacheExpiryNotRunning", "ContentcacheCorruptBlobsFound",
    }


def test_each_alert_fires_when_its_trouble_happens_and_not_otherwise() -> None:
    # promtool's unit tests: series of a healthy cache and of one where
    # everything goes wrong, and which alerts each fires.
    result = promtool("test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {rule["alertname"] for test in yaml.safe_load(open(ALERT_TESTS))["tests"]
              for rule in test["alert_rule_test"] if rule.get("exp_alerts")}
    assert len(tested) == 8


def test_every_dashboard_expression_is_promql(tmp_path: Any) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    rules = []
    for i, expression in enumerate(expressions):
        for variable, value in GRAFANA_VARIABLES.items():
            expression = expression.replace(variable, value)
        assert "$" not in expression, expression
        rules.append({"record": f"dashboard:expression_{i}", "expr": expression})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, UpstreamFixture]]:
    tree = build_tree(str(tmp_path_factory.mktemp("proxy")), modules())
    upstream = UpstreamFixture(tree)
    started = Daemon(str(tmp_path_factory.mktemp("storage")), [
        "--workers", "2", "--go-upstream", upstream.url, "--go-sumdb", "off", "--npm-upstream", upstream.url,
    ])
    yield started, upstream
    started.stop()
    upstream.stop()


def sample_names(daemon: Daemon) -> set[str]:
    status, _, body = request(daemon.url, "/metrics")
    assert status == 200
    return {s.name for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_every_metric_the_dashboard_and_alerts_use_is_served_from_the_start(
    daemon: tuple[Daemon, UpstreamFixture],
) -> None:
    served, _ = daemon
    wanted = {m for expression in dashboard_expressions() + alert_expressions() for m in METRIC.findall(expression)}
    assert len(wanted) >= 25
    # Before any request (but this scrape) was answered...
    missing = wanted - sample_names(served)
    assert not missing, f"not in /metrics of a daemon just started: {sorted(missing)}"
    # ...and after traffic, through both workers.
    for _ in range(3):
        for path in (f"/goproxy/{GREET}/@v/v1.0.0.info", f"/goproxy/{GREET}/@v/v1.0.0.zip", "/npm/no-such-package"):
            request(served.url, path)
    missing = wanted - sample_names(served)
    assert not missing, f"not in /metrics after traffic: {sorted(missing)}"
