"""quantizers."""
