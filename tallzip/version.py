"""The package version (one place; setup.cfg says the same)."""
__version__ = "0.1.0"
