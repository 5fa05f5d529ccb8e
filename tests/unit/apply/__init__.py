"""Unit tests of meshnet.apply (root-free: fakes stand in for the tools)."""
