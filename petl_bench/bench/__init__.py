"""The benchmark harness: one run (fit + test + record), the grid of runs over methods and seeds, and the report."""
