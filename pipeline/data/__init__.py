"""Datasets: the on-disk format (`format`), the built-in generated dataset (`synthetic`), and
how Ray Data reads and decodes them for training and evaluation."""
