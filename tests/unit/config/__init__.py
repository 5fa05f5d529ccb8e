"""Unit tests of meshnet.config."""
