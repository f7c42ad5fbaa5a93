"""streams.sources."""
