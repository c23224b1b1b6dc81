"""The scheduling core: requests, sampling parameters, batches, the scheduler and its prefill
admission, the batching-policy base and the worker protocol.

Nothing in this package imports torch (``tests/test_layout.py`` walks it to check), so the
scheduler can be read, tested and benchmarked without a model.
"""
