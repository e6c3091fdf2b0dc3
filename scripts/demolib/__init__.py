"""The two-plant demo (``scripts/demo``): layout and story, processes, watchers, view, summary."""
