from setuptools import find_packages, setup

setup(
    name="megatron-ls",
    version="0.1.0",
    description="Megatron/DeepSpeed-style training of the Long-Short Transformer as a character LM",
    packages=find_packages(include=["megatron_ls", "megatron_ls.*"]),
    python_requires=">=3.10",
    # torch==2.13.0 is installed first by scripts/setup_env.sh, not listed here:
    # a bare range here would let pip pull a CUDA build on a machine without it.
    # Enough to load a consolidated checkpoint, evaluate and sample (no DeepSpeed needed).
    install_requires=["numpy", "tqdm", "safetensors"],
    extras_require={
        "train": ["deepspeed==0.19.8", "tensorboard"],
        "sentencepiece": ["sentencepiece"],
        # tools/plot_runs.py, tools/compare_runs.py, bench/long_range.py, examples/compare_attention.sh
        "plot": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "mls-preprocess-data=megatron_ls.cli.preprocess_data:main",
            "mls-convert-checkpoint=megatron_ls.cli.convert_checkpoint:main",
            "mls-generate=megatron_ls.cli.generate:main",
            "mls-evaluate=megatron_ls.cli.evaluate:main",
            "mls-plot-runs=megatron_ls.cli.plot_runs:main",
            "mls-compare-runs=megatron_ls.cli.compare_runs:main",
        ],
    },
)
