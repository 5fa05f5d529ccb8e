"""Unit tests of meshnet.state."""
