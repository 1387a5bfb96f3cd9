"""Builds the two native parts, with setuptools' C toolchain handling:

- ``_tunfd_preload``: the LD_PRELOAD shim that hands openconnect a tun device from the worker's
  namespace. Built as an extension module, but never imported, only preloaded into openconnect.
- ``_node_helper``: the worker's companion, a small executable (about 1 MB of memory of its own,
  where a Python helper costs 11 MB per worker): the node's end of the TCP relay, and the keeper
  that runs openconnect and brings the tunnel back after the gateway restarts. Links OpenSSL's
  libcrypto (libssl-dev to build).
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "vpn_provider/native"
FLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]


class BuildWithNodeRelay(build_ext):
    def run(self):
        super().run()
        # Next to the preload shim: the build tree, or the source tree for editable installs.
        out_dir = os.path.dirname(self.get_ext_fullpath("vpn_provider._tunfd_preload"))
        sources = [f"{NATIVE}/{name}.c" for name in ("node_helper", "relay_crypto", "tunnel_keeper")]
        objects = self.compiler.compile(sources, output_dir=self.build_temp, extra_postargs=FLAGS)
        # libcrypto (OpenSSL 3, Debian's libssl-dev): the relay's X25519, HKDF, HMAC and AES-GCM.
        self.compiler.link_executable(objects, "_node_helper", output_dir=out_dir, libraries=["crypto"],
                                      extra_postargs=["-pthread", "-s"])


setup(ext_modules=[Extension("vpn_provider._tunfd_preload", sources=[f"{NATIVE}/tunfd_preload.c"],
                             extra_compile_args=FLAGS)],
      cmdclass={"build_ext": BuildWithNodeRelay})
