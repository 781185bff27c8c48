"""moejax: Mixture-of-Experts language models in JAX/Flax."""

import setuptools

setuptools.setup(
    name="moejax",
    version="0.1.0",
    description="Mixture-of-Experts language models in JAX/Flax: routing, dispatch, "
    "expert parallelism, training and scaling laws.",
    packages=setuptools.find_packages(include=["moejax", "moejax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "chex",
        "absl-py",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist"],
    },
)
