"""Embedded models trained by the project on scikit-learn's digits (see :mod:`diffquant.zoo.train`)."""
