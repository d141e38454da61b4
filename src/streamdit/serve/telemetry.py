"""What `streamdit serve` tells machines: `/health` for orchestrators and `/metrics` for Prometheus.

Owns: `health_report(status)` (healthy while the stream runs, pauses or starts up, unhealthy
once it failed, is stopping or a rank is lost) and `prometheus_text(status, hub_stats)` (the
text exposition format, version 0.0.4, written out here: no client library). Both read only
the live status and the hub's counters, so a scrape never touches the generation loop.
"""

from __future__ import annotations

from collections.abc import Mapping

HEALTHY_STATES = ("starting", "running", "paused")


def health_report(status: Mapping[str, object]) -> dict[str, object]:
    ranks = status.get("ranks") or []
    lost = [r["rank"] for r in ranks if isinstance(r, dict) and r.get("state") == "lost"]  # type: ignore[union-attr]
    healthy = status.get("state") in HEALTHY_STATES and not lost and not status.get("failure")
    return {
        "healthy": healthy,
        "state": status.get("state"),
        "failure": status.get("failure"),
        "lost_ranks": lost,
        "chunk_index": status.get("chunk_index"),
        "uptime_s": status.get("uptime_s"),
    }


def prometheus_text(status: Mapping[str, object], hub: Mapping[str, object]) -> str:
    clients = hub.get("clients") or []
    queue = status.get("queue") or {}
    lines: list[str] = []

    def metric(name: str, kind: str, what: str, samples: list[tuple[str, object]]) -> None:
        lines.append(f"# HELP streamdit_{name} {what}")
        lines.append(f"# TYPE streamdit_{name} {kind}")
        for labels, value in samples:
            if value is not None:
                lines.append(f"streamdit_{name}{labels} {float(value)!r}")  # type: ignore[arg-type]

    state = status.get("state")
    metric(
        "up", "gauge", "1 while the stream is healthy", [("", 1 if health_report(status)["healthy"] else 0)]
    )
    metric(
        "state",
        "gauge",
        "the stream's state (1 for the current one)",
        [(f'{{state="{s}"}}', 1 if s == state else 0) for s in (*HEALTHY_STATES, "stopping")],
    )
    metric("frames_total", "counter", "frames generated and written", [("", status.get("frames_total"))])
    metric("chunk_index", "gauge", "index of the last chunk written", [("", status.get("chunk_index"))])
    metric(
        "cache_epoch", "gauge", "KV-cache epoch (bumped by each hard cut)", [("", status.get("cache_epoch"))]
    )
    metric(
        "fps", "gauge", "frames per second over the last chunks, pauses excluded", [("", status.get("fps"))]
    )
    metric(
        "chunk_period_milliseconds",
        "gauge",
        "chunk period percentiles, pauses excluded",
        [
            ('{quantile="0.5"}', status.get("period_ms_p50")),
            ('{quantile="0.99"}', status.get("period_ms_p99")),
        ],
    )
    if isinstance(queue, dict):
        metric(
            "queue_depth",
            "gauge",
            "pp: envelopes in flight and link queue depths",
            [(f'{{queue="{k}"}}', v) for k, v in queue.items()],
        )
    metric("viewers", "gauge", "connected browser viewers", [("", len(clients))])  # type: ignore[arg-type]
    dropped = sum(int(c["dropped"]) for c in clients)  # type: ignore[index,union-attr]
    metric("viewer_frames_dropped", "gauge", "frames dropped for the viewers connected now", [("", dropped)])
    metric(
        "frames_encoded_total",
        "counter",
        "frames JPEG-encoded for viewers",
        [("", hub.get("frames_encoded"))],
    )
    metric(
        "encoder_chunks_dropped_total",
        "counter",
        "chunks the viewer encoder could not keep up with",
        [("", hub.get("encoder_chunks_dropped"))],
    )
    ranks = status.get("ranks") or []
    metric(
        "rank_up",
        "gauge",
        "1 while the rank's heartbeats arrive",
        [(f'{{rank="{r["rank"]}"}}', 0 if r["state"] == "lost" else 1) for r in ranks],  # type: ignore[index]
    )
    metric(
        "uptime_seconds",
        "gauge",
        "seconds since the stream's controls started",
        [("", status.get("uptime_s"))],
    )
    return "\n".join(lines) + "\n"
