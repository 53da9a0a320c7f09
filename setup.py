"""magnet-engine: a fast inference engine for MAGNeT.

Three source folders map onto one package (see DESIGN.md):
python/magnet_engine -> magnet_engine, engine/ -> magnet_engine.engine,
kernels/ -> magnet_engine.kernels; csrc/ builds magnet_engine._C (optional).
"""
import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("MAGNET_ENGINE_NO_EXT") != "1":
    try:
        from pybind11.setup_helpers import Pybind11Extension, build_ext

        sources = sorted(glob.glob("csrc/*.cpp"))
        if sources:
            ext_modules.append(Pybind11Extension(
                "magnet_engine._C", sources,
                extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"],
                cxx_std=17,
            ))
            for ext in ext_modules:
                ext.optional = True  # the engine runs on the torch path without it
            cmdclass["build_ext"] = build_ext
    except ImportError:  # pybind11 missing: pure-Python install, torch paths only
        pass

setup(
    name="magnet-engine",
    version="0.1.0",
    description="Fast, faithful inference engine for MAGNeT text-to-music/audio models",
    python_requires=">=3.10",
    package_dir={
        "magnet_engine": "python/magnet_engine",
        "magnet_engine.engine": "engine",
        "magnet_engine.kernels": "kernels",
    },
    packages=["magnet_engine", "magnet_engine.engine", "magnet_engine.kernels"],
    package_data={"magnet_engine": ["static/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # A range that CUDA builds of torch satisfy; the README installs the CPU wheel first.
        "torch>=2.1,<2.14",
        "numpy",
        # 4.x keeps the slow sentencepiece T5Tokenizer, which is what audiocraft tokenizes with.
        "transformers>=4.38,<5",
        "sentencepiece",
        "omegaconf>=2.3",
        "soundfile",
        "tqdm",
        "einops",  # used by the encodec package's modules
        "huggingface_hub",
    ],
    extras_require={
        "gpu": ["triton", "flash-attn"],
        "triton": ["triton"],
        "serve": ["fastapi", "uvicorn", "httpx", "python-multipart"],
        "test": ["pytest", "triton", "fastapi", "uvicorn", "httpx", "python-multipart", "selenium"],
    },
    entry_points={"console_scripts": ["magnet-engine=magnet_engine.cli:main"]},
)
