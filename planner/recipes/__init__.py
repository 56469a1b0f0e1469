"""Recipes as data (recipe: TOML files naming one scheme each) and mixed-precision recipes (mixed)."""
