"""Tandem's controller: what should be true (resources, store) and the loop that makes it so."""
