"""Each capture is also an OTLP span, `freezeframe.capture`, on the
sidecar's own service: decoded here with the official opentelemetry-proto
trace classes, its links must point at the frozen requests and its
`pyroscope.profile.id` at a span id the profile's samples carry."""

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from otlp_receiver import GrpcReceiver
from test_export import DOWNWARD_API, LATENCY_RULE, any_value, export_config, freeze_and_capture, profiles_of


class TracesReceiver:
    """`POST /v1/traces`, answering success."""

    def __init__(self):
        self.requests = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                status = 404
                if self.path == "/v1/traces":
                    receiver.requests.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                    status = 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_capture_span_links_the_frozen_requests_and_names_the_profile(sidecar_factory, app_factory):
    profiles = GrpcReceiver()
    traces = TracesReceiver()
    try:
        export = export_config(profiles.port, extra=f'traces_endpoint = "http://127.0.0.1:{traces.port}"')
        sidecar = sidecar_factory(LATENCY_RULE, export=export, env=DOWNWARD_API)
        app = app_factory("grpc", sidecar.grpc)
        freeze_start, freeze_end, event = freeze_and_capture(sidecar, app)
        received = profiles.wait_for(1, timeout=30)[0]
        assert sidecar.wait_for_metric("freezeframe_export_total", 1, timeout=20, exporter="otlp_traces", outcome="delivered") == 1
    finally:
        profiles.stop()
        traces.stop()

    [request] = traces.requests
    [resource_spans] = request.resource_spans
    resource = {kv.key: any_value(kv.value) for kv in resource_spans.resource.attributes}
    assert resource["service.name"] == "freezeframe", "the sidecar's own service"
    assert resource["k8s.pod.name"] == "feed-7d9f"
    [span] = resource_spans.scope_spans[0].spans
    assert span.name == "freezeframe.capture"
    assert span.kind == trace_pb2.Span.SPAN_KIND_INTERNAL
    assert len(span.trace_id) == 16 and len(span.span_id) == 8

    # Over the capture window, as the profile says it.
    [(_, profile)] = profiles_of(received)
    assert span.start_time_unix_nano == profile.time_unix_nano
    assert span.end_time_unix_nano == profile.time_unix_nano + profile.duration_nano

    attributes = {kv.key: any_value(kv.value) for kv in span.attributes}
    assert attributes["freezeframe.rule.name"] == "feed-latency"
    assert attributes["freezeframe.capture.id"] == event["capture_id"]
    assert attributes["freezeframe.rule.cause"] == event["cause"]
    assert attributes["freezeframe.lock"].startswith("futex@0x"), attributes

    # Links: the requests the profile's samples are linked to, and only
    # requests that overlapped the freeze.
    dictionary = received.request.dictionary
    sample_links = {
        (dictionary.link_table[s.link_index].trace_id, dictionary.link_table[s.link_index].span_id)
        for s in profile.samples if s.link_index
    }
    span_links = {(link.trace_id, link.span_id) for link in span.links}
    assert span_links and span_links == sample_links
    assert {trace_id.hex() for trace_id, _ in span_links} <= app.requests(freeze_start, freeze_end)

    # Tempo's "Profiles for this span" asks Pyroscope for this span id.
    assert attributes["pyroscope.profile.id"] in {span_id.hex() for _, span_id in sample_links}
