"""Unit tests of meshnet.render."""
