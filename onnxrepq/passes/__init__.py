"""Graph passes: each module holds one pass that takes a graph and returns it (see base.py)."""
