"""The decode runtime (DESIGN section 8): a session over a memory on disk, the KV cache kept
across refocus edits, sampling and the per-refocus telemetry."""
