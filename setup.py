"""Build d2v_engine: the Python package, `kernels/` as `d2v_engine.kernels`, and the optional C++ extension.

Switches:
    D2V_SKIP_EXT=1   pure-Python install (the reference backend works everywhere)
    MAX_JOBS=N       parallel compile jobs for the extension (read by torch's build helpers)
The extension `d2v_engine._C` is built from `csrc/*.cpp` when there are sources and a compiler;
a failed optional build leaves a working pure-Python install behind.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))


def native_extensions():
    """The pybind11 C++ extension, or nothing when skipped or there is nothing to build."""
    if os.environ.get("D2V_SKIP_EXT") == "1" or not CSRC:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    # -g0: Python's default flags carry -g, which makes the library 10x larger for no user benefit.
    ext = CppExtension("d2v_engine._C", CSRC, extra_compile_args=["-O3", "-g0", "-fopenmp"],
                       extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """Build d2v_engine._C, or warn and go on: the package works on the reference backend."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # a compiler error must not fail the whole install
                print(f"WARNING: the optional C++ extension d2v_engine._C was not built ({err}); "
                      f"kernels.backend=auto falls back to the reference ops.")

    return [ext], {"build_ext": OptionalBuildExtension}


packages = find_packages(include=["d2v_engine", "d2v_engine.*"])
ext_modules, cmdclass = native_extensions()

setup(
    name="d2v_engine",
    version="0.1.0",
    description="A data2vec pretraining engine for images, speech and text with fused kernels",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ is installed as d2v_engine.kernels: never as a top-level `kernels` module, because a
    # PyPI package of that name exists and transformers imports it when present.
    packages=packages + ["d2v_engine.kernels"],
    package_dir={"d2v_engine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6", "deepspeed>=0.15", "webdataset>=0.2", "pybind11", "soundfile", "pillow",
        "tokenizers", "pyyaml", "tqdm", "tensorboard", "matplotlib", "scikit-learn", "numpy",
        "safetensors",   # `d2v export` files: tensors and JSON, nothing that runs when read
    ],
    extras_require={
        "gpu": ["triton", "nvidia-dali-cuda120"],
        "dali": ["nvidia-dali-cuda120"],
        "test": ["pytest"],
        # Hugging Face interop (`d2v_engine.hf`, `d2v hf-import` / `d2v hf-export`)
        "hf": ["transformers>=5.24,<6"],
    },
    entry_points={"console_scripts": ["d2v = d2v_engine.cli:main"]},
)
