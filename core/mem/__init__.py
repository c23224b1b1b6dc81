"""KV memory bookkeeping: the paged token-to-KV allocator, the request-to-token table, the radix
prefix cache and the manager that ties them to requests. Torch-free: the tensors live in the
worker; this package only counts pages and slots.
"""
