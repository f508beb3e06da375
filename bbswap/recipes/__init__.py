"""Recipes: the op schema, TOML in and out, and each op's validation and application."""
