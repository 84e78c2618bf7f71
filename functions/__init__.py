"""Thin Azure Functions triggers (one Blueprint per trigger family)."""
