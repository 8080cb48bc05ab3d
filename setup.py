from setuptools import find_packages, setup

setup(
    name="resnext-triton",
    version="0.1.0",
    description="Fused Triton kernels for ResNeXt/ResNet: grouped conv + BatchNorm + ReLU, residual epilogue",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kernels", "kernels.*", "resnext", "resnext.*", "benchmarks", "benchmarks.*"]),
    # tables measured by resnext.tune on a GPU, shipped as defaults (resnext/tuned/README.md)
    package_data={"resnext": ["tuned/*.json", "tuned/README.md"]},
    python_requires=">=3.9",
    # Triton: the versions CI tests (3.6 in .ci/triton36.sh, 3.8 with the models' torch 2.14.1, 3.9 in
    # the main run); see docs/portability.md for the GPU architectures x Triton versions.
    install_requires=["torch>=2.4", "triton>=3.6,<3.10", "numpy"],
    extras_require={
        # pytest-xdist: the tests on every core (-n auto); ml_dtypes: bf16 in Triton's CPU interpreter
        # (tests/interpreter_bf16.py)
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "ml_dtypes"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["resnext-profile=benchmarks.profile:main"]},
)
