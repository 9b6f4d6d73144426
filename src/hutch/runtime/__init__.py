"""The runtime: many boxes, persisted across processes."""
