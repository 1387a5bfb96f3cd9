"""Builds the LD_PRELOAD shim that hands openconnect a tun device from the worker's namespace.

It is compiled as an extension module only to ride on setuptools' C toolchain handling; it is
never imported, only preloaded into openconnect.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("vpn_provider._tunfd_preload",
                             sources=["vpn_provider/native/tunfd_preload.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
