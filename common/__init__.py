"""What every part of distil shares: the user-error type, config loading, atomic files, hashing, shipped files.

Nothing here imports from `distil.data_pipeline`, `distil.pretrain` or `distil.kernels`.
"""
