"""Experiments: one runner (runner.py) and the tables declared on it (table1.py), rendered by render.py."""
