"""The federated algorithm core: client update, payloads, aggregation, selection, accounting.

Pure functions over tensors and plain state; no file I/O, no printing, no framework. The in-process runner
and the Flower apps both call these.
"""
