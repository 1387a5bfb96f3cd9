"""Builds the two native parts, with setuptools' C toolchain handling:

- ``_tunfd_preload``: the LD_PRELOAD shim that hands openconnect a tun device from the worker's
  namespace. Built as an extension module, but never imported, only preloaded into openconnect.
- ``_relay_pump.so``: the gateway's end of each relayed flow, the node helper's own pumps
  (flow_pump.c) in a plain shared library that the gateway's Python relay loads with ctypes.
- ``_node_helper``: the worker's companion, a small executable (about 1 MB of memory of its own,
  where a Python helper costs 11 MB per worker): the node's end of the TCP relay, and the keeper
  that runs openconnect and brings the tunnel back after the gateway restarts. Links OpenSSL's
  libcrypto (libssl-dev to build).
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "vpn_provider/native"
FLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2"]


class BuildWithNodeRelay(build_ext):
    def run(self):
        super().run()
        # Next to the preload shim: the build tree, or the source tree for editable installs.
        out_dir = os.path.dirname(self.get_ext_fullpath("vpn_provider._tunfd_preload"))
        sources = [f"{NATIVE}/{name}.c" for name in ("node_helper", "flow_pump", "relay_crypto", "tunnel_keeper")]
        objects = self.compiler.compile(sources, output_dir=self.build_temp, extra_postargs=FLAGS)
        # libcrypto (OpenSSL 3, Debian's libssl-dev): the relay's X25519, HKDF, HMAC and AES-GCM,
        # linked in statically into a position-dependent executable: its relocated tables then
        # sit in file pages that every helper on the node shares, where a shared libcrypto (or a
        # PIE) gives each worker 0.3-0.4 MB of private copies (measured: PSS 1.23 -> 0.90 MB
        # with 4 workers). As cryptography's own wheels do, we ship the OpenSSL we built with.
        self.compiler.link_executable(objects, "_node_helper", output_dir=out_dir,
                                      extra_postargs=["-no-pie", "-Wl,-z,relro,-z,now", "-Wl,-Bstatic", "-lcrypto",
                                                      "-Wl,-Bdynamic", "-ldl", "-pthread", "-s"])
        # No Python in it, so no Python ABI in its name: ctypes loads it by path. libcrypto
        # linked in (its static archive is position-independent), its symbols kept private, so
        # it never meets the OpenSSL that the `cryptography` package brings into the process.
        pic_sources = [f"{NATIVE}/{name}.c" for name in ("relay_pump", "flow_pump", "relay_crypto")]
        pic_objects = self.compiler.compile(pic_sources, output_dir=os.path.join(self.build_temp, "pic"),
                                            extra_postargs=[*FLAGS, "-fPIC", "-fvisibility=hidden"])
        self.compiler.link_shared_object(pic_objects, "_relay_pump.so", output_dir=out_dir,
                                         extra_postargs=["-Wl,-z,relro,-z,now", "-Wl,--exclude-libs,ALL",
                                                         "-Wl,-Bstatic", "-lcrypto", "-Wl,-Bdynamic", "-ldl",
                                                         "-pthread", "-s"])

setup(ext_modules=[Extension("vpn_provider._tunfd_preload", sources=[f"{NATIVE}/tunfd_preload.c"],
                             extra_compile_args=FLAGS)],
      cmdclass={"build_ext": BuildWithNodeRelay})
