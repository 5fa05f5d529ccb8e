"""Unit tests of meshnet.cli."""
