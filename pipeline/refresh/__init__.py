"""The refresh actor and the full-set indexes it rebuilds while training runs."""
