"""Renderers: a Ruleset in, text out. They never decide policy."""
