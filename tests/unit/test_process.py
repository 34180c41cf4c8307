"""Process bootstrap: the standard OpenTelemetry variables decide the OTLP exporter and the
service name (the global providers are never installed here)."""

from __future__ import annotations

import logging

import pytest

from meshserve.common.process import default_sampler, otlp_span_exporter, service_resource

_OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_no_otlp_endpoint_means_no_exporter() -> None:
    assert otlp_span_exporter() is None


def test_traces_exporter_none_turns_otlp_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert otlp_span_exporter() is None


@pytest.mark.parametrize(
    ("variable", "protocol", "package"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http/protobuf", "http"),
    ],
)
def test_an_endpoint_asks_for_the_exporter_of_its_protocol(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
    protocol: str,
    package: str,
) -> None:
    monkeypatch.setenv(variable, "http://127.0.0.1:4317")
    if protocol:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    module = f"opentelemetry.exporter.otlp.proto.{package}.trace_exporter"
    try:
        __import__(module)
    except ImportError:  # the optional package is absent: a warning, nothing exported
        with caplog.at_level(logging.WARNING, logger="meshserve"):
            assert otlp_span_exporter() is None
        assert f"opentelemetry-exporter-otlp-proto-{package}" in caplog.text
    else:
        exporter = otlp_span_exporter()
        assert type(exporter).__module__ == module


def test_the_service_name_defaults_to_the_process_and_yields_to_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert service_resource("meshserve-node").attributes["service.name"] == "meshserve-node"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=edge-7,deployment.environment=lab")
    resource = service_resource("meshserve-node")
    assert resource.attributes["service.name"] == "edge-7"
    assert resource.attributes["deployment.environment"] == "lab"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-8")
    assert service_resource("meshserve-node").attributes["service.name"] == "edge-8"


def test_an_exporter_with_no_sampler_traces_every_query(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.sampling import ParentBased

    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    sampler, ratio = default_sampler()
    assert isinstance(sampler, ParentBased) and ratio is None  # parentbased_always_on
    assert "AlwaysOnSampler" in sampler.get_description()


def test_a_traceidratio_sampler_is_applied_where_queries_enter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    assert default_sampler()[1] == 0.01
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert default_sampler() == (None, None)  # the SDK reads the variables itself
