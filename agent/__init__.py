"""Tandem's agent: every action that touches the operating system."""
