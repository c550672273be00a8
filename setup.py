"""Build of the C core (vela._native); everything else lives in pyproject.toml."""
import glob
import os

from setuptools import Extension, setup

# VELA_SANITIZE=address builds the core with AddressSanitizer (see README, "Testing").
sanitize = os.environ.get("VELA_SANITIZE", "")
extra_compile = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fno-strict-aliasing"]
extra_link = []
if sanitize:
    extra_compile += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-O1", "-g"]
    extra_link += [f"-fsanitize={sanitize}"]

setup(
    ext_modules=[
        Extension(
            "vela._native",
            sources=sorted(glob.glob("native/*.c")),
            include_dirs=["native", "native/third_party/xxhash"],
            depends=sorted(glob.glob("native/*.h")),
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
            libraries=["pthread", "rt"],
        )
    ],
)
