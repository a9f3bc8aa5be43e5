"""The version of volarray (recorded in outputs' attributes)."""
__version__ = "0.1.0"
