"""mmload's Numba CUDA kernels, one op per module (see README.md in this folder).

Importing this package imports nothing: each kernel module imports ``numba.cuda`` itself and
compiles its kernels on first launch.
"""
