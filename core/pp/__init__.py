"""Pipeline parallelism: the model's layers split over stage processes (``loop=pp``).

``split`` decides who runs which layers and on which node, ``wire`` moves batch metadata,
hidden states and tokens between stages over a torch.distributed gloo group, ``stage`` is the
loop of ranks 1..N-1, and ``pipeline`` is the worker rank 0's scheduler drives.
"""
