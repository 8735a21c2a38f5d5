"""server.py with OpenTelemetry's SDK and its in-memory exporter installed, as an operator's tracing
setup would be: every span the server finishes is kept, and at exit written to $SPANS_FILE as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import server  # noqa: E402 - after the provider, as a deployment's own start-up would

code = server.main(sys.argv[1:])
spans = [{"name": span.name, "kind": span.kind.name, "trace_id": format(span.context.trace_id, "032x"),
          "span_id": format(span.context.span_id, "016x"),
          "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
          "attributes": dict(span.attributes or {}), "status": span.status.status_code.name}
         for span in exporter.get_finished_spans()]
Path(os.environ["SPANS_FILE"]).write_text(json.dumps(spans, default=str))
sys.exit(code)
