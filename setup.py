"""Builds the four native parts. None of them uses Python's C API, so one wheel serves every
Python 3 on its platform (tagged py3-none-<platform>; scripts/build-wheel makes it portable):

- ``_tunfd_preload.so``: the LD_PRELOAD shim that hands openconnect a tun device from the
  worker's namespace. Built as an extension module for the toolchain handling, but named
  without a Python ABI: it is never imported, only preloaded into openconnect.
- ``_relay_preload.so``: the worker's transport where user namespaces are off: preloaded into
  the job, it sends its TCP connects and name lookups to the node helper (relay_preload.c).
- ``_relay_pump.so``: the gateway's end of each relayed flow, the node helper's own pumps
  (flow_pump.c) in a plain shared library that the gateway's Python relay loads with ctypes.
- ``_node_helper``: the worker's companion, a small executable (a small fraction of the memory a
  Python helper would cost per worker): the node's end of the TCP relay, and the keeper
  that runs openconnect and brings the tunnel back after the gateway restarts.

The helper and the pump link OpenSSL's libcrypto statically (libssl-dev to build). Without a C
compiler or libcrypto, the build says so in one line and installs the Python alone: a gateway
then relays with its Python pump, and workers need a wheel with the native parts (README).
VPNP_REQUIRE_NATIVE=1 makes that a failure instead (scripts/setup, scripts/build-wheel).
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

NATIVE = "vpn_provider/native"
FLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2"]


class BuildNative(build_ext):
    def get_ext_filename(self, fullname):
        return os.path.join(*fullname.split(".")) + ".so"  # no Python ABI in the name: see above

    def run(self):
        try:
            super().run()
            self._build_helper_and_pump()
        except Exception as e:  # the compiler's own output says more, above this line
            if os.environ.get("VPNP_REQUIRE_NATIVE") == "1":
                raise
            print(f"vpn-provider: native parts not built ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                  "installing the Python alone: workers need a wheel with them (README: installing)",
                  file=sys.stderr)

    def _build_helper_and_pump(self):
        # Next to the preload shim: the build tree, or the source tree for editable installs.
        out_dir = os.path.dirname(self.get_ext_fullpath("vpn_provider._tunfd_preload"))
        sources = [f"{NATIVE}/{name}.c" for name in ("node_helper", "flow_pump", "relay_crypto", "tunnel_keeper")]
        objects = self.compiler.compile(sources, output_dir=self.build_temp, extra_postargs=FLAGS)
        # libcrypto (OpenSSL 3): the relay's X25519, HKDF, HMAC and AES-GCM, linked in
        # statically into a position-dependent executable: its relocated tables then sit in file
        # pages that every helper on the node shares, where a shared libcrypto (or a PIE) gives
        # each worker private copies of them (the helper's PSS: docs/benchmarks.md). As
        # cryptography's own wheels do, we ship the OpenSSL we built with.
        self.compiler.link_executable(objects, "_node_helper", output_dir=out_dir,
                                      extra_postargs=["-no-pie", "-Wl,-z,relro,-z,now", "-Wl,-Bstatic", "-lcrypto",
                                                      "-Wl,-Bdynamic", "-ldl", "-pthread", "-s"])
        # libcrypto linked in (its static archive is position-independent) and kept private by
        # the version script, so it never meets the OpenSSL of the `cryptography` package.
        pic_sources = [f"{NATIVE}/{name}.c" for name in ("relay_pump", "flow_pump", "relay_crypto")]
        pic_objects = self.compiler.compile(pic_sources, output_dir=os.path.join(self.build_temp, "pic"),
                                            extra_postargs=[*FLAGS, "-fPIC"])
        self.compiler.link_shared_object(pic_objects, "_relay_pump.so", output_dir=out_dir,
                                         extra_postargs=["-Wl,-z,relro,-z,now",
                                                         f"-Wl,--version-script={NATIVE}/relay_pump.map",
                                                         "-Wl,-Bstatic", "-lcrypto", "-Wl,-Bdynamic", "-ldl",
                                                         "-pthread", "-s"])


class PlatformWheel(bdist_wheel):
    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform  # any Python 3: nothing native here speaks to Python


# -ldl: dlsym lives in libdl before glibc 2.34, and the portable wheel targets 2.17.
# -fvisibility=hidden: the preloaded library exports only the calls it stands in for.
setup(ext_modules=[Extension("vpn_provider._tunfd_preload", sources=[f"{NATIVE}/tunfd_preload.c"],
                             extra_compile_args=FLAGS, extra_link_args=["-ldl"]),
                   Extension("vpn_provider._relay_preload", sources=[f"{NATIVE}/relay_preload.c"],
                             extra_compile_args=[*FLAGS, "-fvisibility=hidden"],
                             extra_link_args=["-ldl", "-pthread", "-Wl,-z,relro,-z,now"])],
      cmdclass={"build_ext": BuildNative, "bdist_wheel": PlatformWheel})
