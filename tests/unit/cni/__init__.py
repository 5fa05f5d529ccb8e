"""Unit tests of meshnet.cni's pure parts (pod decisions, plugin config)."""
