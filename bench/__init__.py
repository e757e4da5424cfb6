"""Benchmarks: ``dpfpl bench`` grids (grid, presets, harness, report, timing, cli) and the
pytest-benchmark micro-benchmarks (``make microbench``). Importing this package imports nothing
heavy; the modules load torch and matplotlib only when used."""
