"""circleloss-ext: fused Circle Loss for PyTorch.

kernels/ (Triton code only) installs as circleloss_ext.kernels, never as a top-level `kernels`.
Install without build isolation so that pip does not fetch another torch into a build environment:
    pip install --no-build-isolation -e .
"""
from setuptools import setup

setup(
    name="circleloss-ext",
    version="0.1.0",
    description="Fused Circle Loss (Sun et al., CVPR 2020) for PyTorch: Triton kernels that never hold B x C",
    python_requires=">=3.10",
    packages=["circleloss_ext", "circleloss_ext.kernels"],
    package_dir={"circleloss_ext": "circleloss_ext", "circleloss_ext.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.2", "numpy"],
    extras_require={"test": ["pytest", "hypothesis"]},
)
