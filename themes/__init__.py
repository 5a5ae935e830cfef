"""Textual CSS themes shipped with clora-tui."""
