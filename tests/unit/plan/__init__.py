"""Unit tests of meshnet.plan."""
