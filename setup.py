"""moejax: Mixture-of-Experts language models in JAX/Flax."""

import setuptools

TFDS = [
    "tensorflow-datasets>=4.9",
    "tensorflow-cpu; platform_system == 'Linux' and platform_machine == 'x86_64'",
    "tensorflow; platform_system != 'Linux' or platform_machine != 'x86_64'",
    "importlib_resources",
]

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
        "optax>=0.2.5",
        "orbax-checkpoint",
        "ml-collections",
        "chex",
        "absl-py",
        "numpy",
        "tqdm",
        # TensorBoard event files without importing TensorFlow in the train loop,
        # and the `tensorboard` command to read them.
        "tensorboardX",
        "tensorboard",
        # config.data.tokenizer="sentencepiece".
        "sentencepiece",
        # moejax.scaling.laws fits (scipy.optimize); experiments.fit_scaling plots.
        "scipy",
        "matplotlib",
        # config.data.loader="grain": tokens in ArrayRecord files read at random
        # through a Grain pipeline (moejax/data/streaming.py).
        "grain",
        "array-record",
        # moejax.quantize (per-expert int8/int4) and moejax.train.lora (LoRA/QLoRA):
        # qwix's API moves between releases; 0.1.8 is the one tested.
        "qwix>=0.1.8",
    ],
    extras_require={
        # TFDS datasets (lm1b, c4, ...; tiny_shakespeare only without a manual_dir):
        # TFDS builds and reads them with TensorFlow (kept off accelerators).
        # tensorflow-cpu has wheels for Linux x86_64 only; elsewhere (macOS, Linux
        # aarch64) the plain tensorflow wheel is the CPU build. TFDS 4.9.x imports
        # importlib_resources unconditionally but declares it for Python < 3.9 only.
        "tfds": TFDS,
        # config.model.moe.grouped_matmul="tokamax" (and "auto" on GPU/TPU): the
        # Pallas grouped-matmul kernels of dropless. Optional: it needs jax>=0.9.2
        # and pins typeguard==2.13.3.
        "tokamax": ["tokamax"],
        # python -m moejax.aot: the XLA:TPU compiler (libtpu, 0.7 GB) and the
        # XLA:GPU one (the CUDA plugin without CUDA libraries, 0.2 GB), to compile
        # for TPU and GPU topologies on a host without them. Both must match the
        # installed jax version.
        "aot": ["jax[tpu]", "jax-cuda12-plugin"],
        # moejax.hf: Hugging Face checkpoints (safetensors read with numpy) and
        # their tokenizers (tokenizer.json); no torch.
        "hf": ["safetensors>=0.4", "tokenizers"],
        # nbclient/ipykernel: tests/test_colabs.py executes the notebooks;
        # tokamax: tests/test_grouped_matmul.py checks its kernels (XLA on CPU);
        # jax[tpu] (libtpu): tests/test_aot.py compiles for a TPU topology (the
        # CUDA plugin is left out: it logs to stderr at every jax import).
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "tokamax",
                 "jax[tpu]", "safetensors>=0.4", "tokenizers", *TFDS],
    },
)
