"""Unit tests of meshnet.explain."""
