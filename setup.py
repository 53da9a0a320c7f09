"""magnet-engine: a fast inference engine for MAGNeT.

Three source folders map onto one package (see docs/architecture.md §1):
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
        "magnet_engine.server": "python/magnet_engine/server",
    },
    packages=["magnet_engine", "magnet_engine.server", "magnet_engine.server.routes", "magnet_engine.engine",
              "magnet_engine.engine.playdiffusion", "magnet_engine.kernels"],
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
        "soundfile>=0.13",  # MP3 writing with a bitrate (compression_level, bitrate_mode)
        "pyloudnorm",       # audio_write(strategy='loudness'): ITU-R BS.1770-4 loudness
        "tqdm",
        "einops",  # used by the encodec package's modules
        "huggingface_hub",
        # PlayDiffusion (speech editing): text BPE, word diff, syllable count as upstream, configs.
        "tokenizers",
        "jiwer>=3.0",
        "syllables==1.0.9",  # byte-identical in code to upstream's pinned playht/python-syllables
        "unidecode",
        "pydantic>=2",
        "safetensors",
        # Uploads at any sample rate: libsoxr's resampler costs the same whatever the rates' gcd.
        "soxr>=0.3",
    ],
    extras_require={
        "gpu": ["triton", "flash-attn"],
        "triton": ["triton"],
        # uvicorn pinned below 1: serve.py subclasses its h11 protocol for the request-head timeout.
        "serve": ["fastapi", "uvicorn<1", "h11", "httpx", "prometheus_client>=0.20", "python-multipart"],
        # magnet_engine.cluster (serve --ray); pinned: Serve's deployment options and config
        # schema change between releases.
        "cluster": ["ray[serve]==2.60.0", "fastapi", "uvicorn<1", "h11", "httpx", "prometheus_client>=0.20",
                    "python-multipart"],
        "test": ["pytest", "triton", "fastapi", "uvicorn<1", "h11", "httpx", "prometheus_client>=0.20",
                 "hypothesis>=6.100", "selenium", "python-multipart"],
    },
    entry_points={"console_scripts": ["magnet-engine=magnet_engine.cli:main"]},
)
