"""Benchmarks: ``loopserve bench`` (throughput), the scheduler-overhead mode, peers
(transformers), Hydra sweeps, plots and the sim worker's roofline cost model."""
