"""Benchmark and parity check of fastrnn's backends against torch.nn: `python -m fastrnn bench|check|plot`.

cases.py    the registry of sizes (named case sets)      timing.py    timers and peak memory
roofline.py FLOPs of a case and the device's GEMM rate   machine.py   device name, commit, versions
runner.py   times torch.nn and each backend on a set     report.py    progress line, tables, JSON rows
plot.py     PNG plots from the JSON rows (matplotlib)     compare.py   --base REV: another commit's kernels
check.py    parity of every backend against torch.nn     cli.py       the command line
"""
