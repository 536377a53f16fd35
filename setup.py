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
        # transformer_lens 3.x: CI proves grokfast.to_hooked_transformer (tests/test_lens.py) on every submission.
        "test": ["pytest", "triton>=3.0", "hypothesis", "pytest-benchmark", "transformer_lens>=3,<4"],
        "bench": ["pytest-benchmark", "nvidia-ml-py"],
        "plots": ["matplotlib"],
        # grokfast.to_hooked_transformer; 4.0 removed HookedTransformer.
        "lens": ["transformer_lens>=3,<4"],
    },
    entry_points={"console_scripts": ["grokfast=grokfast.cli:main"]},
)
