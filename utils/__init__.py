"""Attacks, pattern split and sample selection, MI bounds, losses, data and training plumbing."""
