from setuptools import setup

setup(
    name="ditpass",
    version="0.1.0",
    description="Compiler passes that parallelize and speed up Diffusion Transformer inference",
    python_requires=">=3.10",
    packages=["ditpass", "ditpass.analysis", "ditpass.runtime", "ditpass.backend", "ditpass.tools", "ditpass.passes",
              "ditpass.passes.sequence_parallel", "ditpass.models"],
    package_dir={"ditpass": "ditpass", "ditpass.passes": "passes", "ditpass.models": "models"},
    package_data={"ditpass.models": ["weights/*.safetensors", "weights/*.json"]},
    install_requires=["torch>=2.11", "diffusers>=0.35,<0.50", "sympy", "safetensors", "tqdm"],
    extras_require={
        "test": ["pytest", "diffusers==0.42.1", "scikit-learn", "transformers", "fastapi", "uvicorn", "httpx",
                 "schemathesis", "playwright"],
        "serve": ["fastapi", "uvicorn"],
        "nexfort": ["onediff", "nexfort"],
        # FlashAttention-3 forward (Hopper): Plan(attention="fa3"), and "auto" on Hopper
        "fa3": ["fa3-fwd"],
    },
    entry_points={"console_scripts": ["ditpass=ditpass.tools.cli:main"]},
)
