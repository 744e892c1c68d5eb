"""Figures: the only package that imports matplotlib. Each plot function takes a result and an ``ax``."""
