"""
Tracing with the SDK's in-memory exporter: a request through the daemon's
own services (in this process) makes one server span, with the upstream
fetch, store and index spans as its children.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import treq
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from contentcache.tap import Options, makeService

from .daemon import free_port
from .gomodules import GREET, build_tree, modules
from .upstream import UpstreamFixture

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(tracer_provider)


def in_process(tmp_path: Any) -> tuple[Any, UpstreamFixture, int]:
    """
    The daemon's own services, started in this process (so the in-memory
    exporter sees their spans), in front of a fresh upstream fixture.
    """
    upstream = UpstreamFixture(build_tree(str(tmp_path / "proxy"), modules()))
    port = free_port()
    options = Options(environ={})
    options.parseOptions([
        "--port", f"tcp:{port}:interface=127.0.0.1", "--storage", str(tmp_path / "storage"),
        "--go-upstream", upstream.url, "--go-sumdb", "off", "--npm-upstream", "http://127.0.0.1:9",
        "--workers", "1",  # this process's own spans
    ])
    service = makeService(options)
    service.startService()
    return service, upstream, port


CLIENT = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


@pytest_twisted.ensureDeferred
async def test_request_span_with_children(tmp_path: Any) -> None:
    service, upstream, port = in_process(tmp_path)
    client = CLIENT
    try:
        EXPORTER.clear()
        response = await client.get(
            f"http://127.0.0.1:{port}/goproxy/{GREET}/@v/v1.0.0.zip", headers={"Connection": "close"}
        )
        body = await response.content()
        assert response.code == 200 and body[:2] == b"PK"
    finally:
        await service.stopService()
        upstream.stop()
    spans = EXPORTER.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 1
    root = servers[0]
    assert root.name == "GET go"
    assert root.attributes["contentcache.protocol"] == "go"
    assert root.attributes["contentcache.cache_result"] == "miss"
    assert root.attributes["http.response.status_code"] == 200
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
    assert {"upstream fetch", "store put", "index put"} <= set(children)
    fetch = children["upstream fetch"]
    assert fetch.kind == SpanKind.CLIENT
    assert fetch.attributes["http.response.status_code"] == 200
    assert fetch.attributes["url.full"].endswith(f"/{GREET}/@v/v1.0.0.zip")
    assert children["store put"].attributes["contentcache.bytes"] > 0
    assert all(s.context.trace_id == root.context.trace_id for s in children.values())


@pytest_twisted.ensureDeferred
async def test_a_hit_is_one_span(tmp_path: Any) -> None:
    service, upstream, port = in_process(tmp_path)
    client = CLIENT
    url = f"http://127.0.0.1:{port}/goproxy/{GREET}/@v/v1.0.0.info"
    try:
        await (await client.get(url, headers={"Connection": "close"})).content()
        EXPORTER.clear()
        response = await client.get(url, headers={"Connection": "close"})
        await response.content()
        assert response.headers.getRawHeaders("x-cache") == ["HIT"]
    finally:
        await service.stopService()
        upstream.stop()
    spans = EXPORTER.get_finished_spans()
    assert [(s.name, s.attributes["contentcache.cache_result"]) for s in spans] == [("GET go", "hit")]
