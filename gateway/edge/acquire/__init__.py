"""Acquisition: the sources that turn probe and broker data into readings."""
