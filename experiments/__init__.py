"""Experiments built on the package (never imported by it): each a driver with its own command and report."""
