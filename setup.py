"""oscqat: oscillation-aware quantization-aware training. `kernels/` installs as `oscqat.kernels`."""
from setuptools import setup

setup(
    name="oscqat",
    version="0.1.0",
    description="Oscillation-aware quantization-aware training with fused kernels",
    packages=["oscqat", "oscqat.kernels"],
    package_dir={"oscqat": "oscqat", "oscqat.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["matplotlib", "tqdm", "scikit-learn"],
        "test": ["pytest", "hypothesis", "triton>=3.0", "matplotlib", "tqdm", "scikit-learn", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["oscqat=oscqat.cli:main"]},
)
