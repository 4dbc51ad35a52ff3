"""
OpenTelemetry tracing: a span per request, with child spans for upstream
fetches, store reads and writes, and index calls.

The code uses only opentelemetry-api, whose tracer does nothing until an
SDK is configured; child spans are started only under a recorded span, so
with no OTEL_* settings (or for requests a sampler leaves out) a request
costs one no-op span. A cache hit records only its request span: the index
lookup and a one-read blob are attributes of the hit, not spans.
With the SDK installed (``pip install contentcache[otel]``) it is
configured the standard way, from OTEL_TRACES_EXPORTER (otlp, console,
none), OTEL_EXPORTER_OTLP_* and OTEL_SERVICE_NAME.

Twisted runs each coroutine step in the context it started with, so the
current span follows a request across its awaits; thread-pool calls are
wrapped in spans on the reactor side.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, TypeVar

from opentelemetry import trace
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()
tracer = trace.get_tracer("contentcache")
T = TypeVar("T")

_SETTINGS = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def recording() -> bool:
    """
    Whether the current request is traced: with tracing off, or for a
    request the sampler left out, child spans are not even started (they
    cost a cache hit several per cent).
    """
    return trace.get_current_span().is_recording()


def child_span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """
    A span under the current one, or nothing when that one is not traced.
    """
    if not recording():
        return nullcontext()
    return tracer.start_as_current_span(name, attributes=attributes)


def traced_call(name: str, d: Deferred[T], **attributes: Any) -> Deferred[T]:
    """
    A span (a child of the current one) from now until C{d} fires: for
    calls that run on the disk pool.
    """
    if not recording():
        return d
    span = tracer.start_span(name, attributes=attributes)

    def end(result: T) -> T:
        span.end()
        return result

    return d.addBoth(end)


def configure(environ: Any = os.environ) -> Callable[[], None] | None:
    """
    Install the SDK's tracer provider if OTEL_* settings ask for export;
    returns its shutdown, or L{None} when tracing stays off.
    """
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if not any(environ.get(name) for name in _SETTINGS):
        return None
    exporter_name = environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip()
    if exporter_name == "none":
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        log.warn("OTEL_* settings ask for traces, but the OpenTelemetry SDK is not installed "
                 "(pip install 'contentcache[otel]'): tracing stays off")
        return None
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warn("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http "
                     "(pip install 'contentcache[otel]'): tracing stays off")
            return None
        exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "contentcache")}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans with {exporter}", exporter=exporter_name)
    return provider.shutdown


class TracingService(Service):
    """
    Configures tracing at start and flushes what is left at stop.
    """

    def __init__(self) -> None:
        self._shutdown: Callable[[], None] | None = None

    def startService(self) -> None:
        super().startService()
        self._shutdown = configure()

    def stopService(self) -> None:
        super().stopService()
        if self._shutdown is not None:
            self._shutdown()
            self._shutdown = None
