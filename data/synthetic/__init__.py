"""Phantoms written as real files in the real dataset layouts, read back by the same readers."""
