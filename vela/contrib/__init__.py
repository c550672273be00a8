"""Integrations of Vela with other frameworks (each imports its framework lazily)."""
