"""Build of the C core (vela._native); everything else lives in pyproject.toml."""
import glob
import os

from setuptools import Extension, setup

# VELA_SANITIZE=address[,undefined] builds the core with AddressSanitizer (and
# UndefinedBehaviorSanitizer, which then stops at the first finding); VELA_WERROR=1
# makes every warning an error (tools/sanitize.sh, tools/asan.sh; README, "Testing").
sanitize = os.environ.get("VELA_SANITIZE", "")
# The binding's files call the core's across files on the hot path (get): with
# link-time optimisation, and every symbol but PyInit__native hidden (so none can
# be interposed), they are inlined as if they were one file.
extra_compile = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fno-strict-aliasing", "-flto=auto",
                 "-fvisibility=hidden"]
extra_link = ["-flto=auto", "-O2", "-fvisibility=hidden"]
if os.environ.get("VELA_WERROR"):
    extra_compile += ["-Werror"]
if sanitize:
    extra_compile += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-O1", "-g"]
    extra_link += [f"-fsanitize={sanitize}"]
    if "undefined" in sanitize.split(","):
        extra_compile += ["-fno-sanitize-recover=undefined"]

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
