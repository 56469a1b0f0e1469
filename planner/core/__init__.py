"""The base: errors, units, safe file I/O, page release (pages) and ranking against a budget (rank)."""
