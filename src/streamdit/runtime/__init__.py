"""Per-chunk phases, topologies, timeline, metrics. May import every layer above it."""
