"""Thin entry points for `python -m jobs.<name>` and `ray job submit -- python -m jobs.<name>`."""
