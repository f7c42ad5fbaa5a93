"""streams.bus."""
