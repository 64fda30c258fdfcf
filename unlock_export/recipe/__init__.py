"""Recipes: the schema, the dry-run plan, the runner."""
