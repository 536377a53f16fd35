from setuptools import setup

setup(
    name="grokfast",
    version="0.1.0",
    description="Grokking on modular arithmetic at the speed of the hardware: fused Triton training step, "
                "PyTorch reference, progress measures",
    python_requires=">=3.10",
    packages=["grokfast", "grokfast.bench", "grokfast.sweep", "grokfast.kernels"],
    package_dir={"grokfast": "grokfast", "grokfast.kernels": "kernels"},
    install_requires=[
        "torch>=2.1",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "kernels": ["triton>=3.0"],
        "test": ["pytest", "triton>=3.0", "hypothesis", "pytest-benchmark"],
        "bench": ["pytest-benchmark", "nvidia-ml-py"],
        "plots": ["matplotlib"],
    },
    entry_points={"console_scripts": ["grokfast=grokfast.cli:main"]},
)
