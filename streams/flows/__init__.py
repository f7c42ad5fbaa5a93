"""streams.flows."""
