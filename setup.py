"""The C++ extension circleloss_ext._C (csrc/, the fused CPU path); everything else is in pyproject.toml.

Install without build isolation, so that the extension builds against the torch already installed
instead of one fetched into a build environment:
    pip install --no-build-isolation --no-deps -e .
Where no C++ compiler is found the package installs without _C and the CPU path falls back to the
reference (with a warning).
"""
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


class OptionalBuildExtension(BuildExtension):
    """Build csrc/ when a compiler is there; otherwise say so and install the rest.

    The whole of build_extensions is guarded: torch checks the compiler's ABI before any extension
    is compiled, and that check is where a missing or unusable compiler fails first."""

    def build_extensions(self):
        try:
            super().build_extensions()
        except Exception as error:  # no compiler, or a toolchain torch cannot use
            print(f"circleloss-ext: the C++ CPU path was not built ({error}); backend='cpu' will be "
                  "unavailable and backend='auto' uses the reference on CPU tensors", file=sys.stderr)


setup(
    # -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself is
    # built with OpenMP; the library binds to the libgomp torch has already loaded (same soname).
    ext_modules=[CppExtension("circleloss_ext._C", ["csrc/circle_loss_cpu.cpp"],
                              extra_compile_args=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
                              extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": OptionalBuildExtension},
)
